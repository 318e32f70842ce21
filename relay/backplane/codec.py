"""A checked page of the log as JetStream messages, and back.

A message covers the log from ``Relay-After`` (exclusive) to
``Relay-Reached`` (inclusive) and carries every valid event in between, each
with its rendered object (``data``) byte for byte as the recorder rendered
it: gateways never render or validate again. A page larger than one message is cut into
consecutive messages; an event too large for any message is left out, and the
next message starts after it, so a gateway sees the gap and reads that event
from PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from relay.errors import ConfigError
from relay.log import LogEvent, Page, Position

__all__ = [
    "AFTER",
    "REACHED",
    "BackplaneConfig",
    "Chunk",
    "decode",
    "encode",
    "parse_backplane_url",
    "parse_position",
    "position_text",
]

# One encoder: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
AFTER = "Relay-After"
REACHED = "Relay-Reached"
# Not under ``relay.``: the NATS publisher's default stream takes ``relay.>``,
# and would capture (and forward to consumers) the backplane's messages.
_OPTIONS = {"stream": "RELAY_LIVE", "prefix": "relay_live", "max_age": "300"}


@dataclass(frozen=True)
class BackplaneConfig:
    url: str  # may carry credentials: log ``name``
    name: str
    stream: str
    subject: str  # one partition: the hub follows one chain in log order
    max_age: float  # seconds JetStream keeps a message (a gateway's catch-up reach)


def parse_backplane_url(url: str) -> BackplaneConfig:
    """``nats://host:4222?stream=RELAY_LIVE&prefix=relay_live&max_age=300``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"RELAY_BACKPLANE: not a URL ({exc})") from None
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ConfigError(
            f"RELAY_BACKPLANE must be a nats:// or tls:// URL with a host, not {parts.scheme!r}"
        )
    given = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(given.keys() - _OPTIONS.keys())
    if unknown:
        raise ConfigError(
            f"RELAY_BACKPLANE: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_OPTIONS))})"
        )
    options = {**_OPTIONS, **given}
    try:
        max_age = float(options["max_age"])
    except ValueError:
        raise ConfigError("RELAY_BACKPLANE: max_age must be a number of seconds") from None
    if max_age <= 0:
        raise ConfigError("RELAY_BACKPLANE: max_age must be positive")
    for option in ("stream", "prefix"):
        if not options[option] or any(c in options[option] for c in " *>"):
            raise ConfigError(f"RELAY_BACKPLANE: {option} {options[option]!r} is not a valid name")
    if importlib.util.find_spec("nats") is None:
        raise ConfigError(
            "RELAY_BACKPLANE needs the NATS client (nats-py), which this install lacks; "
            "install it with pip install 'relay[brokers]'"
        )
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return BackplaneConfig(
        url=urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        name=urlunsplit((parts.scheme, host, "", "", "")),
        stream=options["stream"],
        subject=f"{options['prefix']}.log",
        max_age=max_age,
    )


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message: the stretch of the log it covers and its events."""

    after: Position
    reached: Position
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        # The stretch is the message's identity: a page published twice (a
        # takeover re-checks it) is dropped by JetStream's duplicate window.
        after, reached = position_text(self.after), position_text(self.reached)
        return {AFTER: after, REACHED: reached, "Nats-Msg-Id": f"{after}-{reached}"}


def position_text(at: Position) -> str:
    """``window.xid.id``: every position, the origin (window -1) included."""
    return f"{at.window}.{at.xid}.{at.id}"


def parse_position(text: str) -> Position:
    """ValueError unless ``text`` is three integers as ``position_text`` writes them."""
    window, xid, row = text.split(".")
    return Position(int(window), int(xid), int(row))


def _described(event: LogEvent) -> bytes:
    """An event's fields but its ``data``, which travels verbatim on a line of its own."""
    at = event.at
    return _ENCODER.encode(
        [at.window, at.xid, at.id, event.sse_event, event.channels, event.event_id,
         event.event_type, event.schema_version, event.restaurant_id, event.order_id,
         event.customer_id, event.occurred_on_utc.isoformat(), event.enqueued_at.isoformat()]
    ).encode()  # fmt: skip


def _body(described: list[bytes], data: list[bytes]) -> bytes:
    """One line listing the events' fields, then each event's ``data``, a line
    each: compact JSON has no newline, and escaping it into a string again
    would cost more than the rest of the message."""
    return b"\n".join([b"[" + b",".join(described) + b"]", *data])


def encode(page: Page, max_bytes: int) -> Iterator[Chunk]:
    """The messages of one page, each at most ``max_bytes`` long, in log order."""
    after = previous = page.after
    described: list[bytes] = []
    data: list[bytes] = []
    size = 2
    for event in page.events:
        fields, text = _described(event), event.data.encode()
        length = len(fields) + len(text) + 2
        if length + 2 > max_bytes:  # never fits: leave a gap in its place
            if described:
                yield Chunk(after, previous, _body(described, data))
                described, data, size = [], [], 2
            after = event.at
            continue
        if described and size + length > max_bytes:
            yield Chunk(after, previous, _body(described, data))
            after, described, data, size = previous, [], [], 2
        described.append(fields)
        data.append(text)
        size += length
        previous = event.at
    yield Chunk(after, page.reached, _body(described, data))


def decode(
    after: str, reached: str, body: bytes
) -> tuple[Position, Position, tuple[LogEvent, ...]]:
    """A message back into the stretch it covers and its events; ValueError if malformed."""
    try:
        start, end = parse_position(after), parse_position(reached)
        lines = body.split(b"\n")
        described = json.loads(lines[0])
        if len(described) != len(lines) - 1:
            raise ValueError(f"{len(described)} events but {len(lines) - 1} data lines")
        fromiso = datetime.fromisoformat
        events = tuple(
            LogEvent(Position(w, x, i), sse, tuple(channels), data.decode(), eid, etype,
                     version, restaurant, order, customer, fromiso(occurred), fromiso(enqueued))
            for (w, x, i, sse, channels, eid, etype, version, restaurant, order, customer,
                 occurred, enqueued), data in zip(described, lines[1:], strict=True)
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed backplane message after {after[:40]!r}: {exc}") from None
    if end < start or any(not start < e.at <= end for e in events):
        raise ValueError(f"a backplane message's events lie outside {after}..{reached}")
    return start, end, events
