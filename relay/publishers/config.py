"""Parse ``RELAY_PUBLISHERS``: one URL per publisher, options in its query string.

    amqp://guest:guest@rabbit:5672/?exchange=relay.events&events=RevenueRecorded
    nats://nats:4222?stream=RELAY&prefix=relay&create=true&name=analytics
    nats://nats:4222?format=cloudevents&source=/orders&schemas=https://relay.example/v1/schemas

A publisher's ``name`` keys its durable offsets; by default it is the URL
without credentials or options, so moving a password never resets delivery.
``format=cloudevents`` (opt-in; the body stays the same JSON) adds the
CloudEvents attributes as headers, in each broker's protocol binding.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from relay.errors import ConfigError
from relay.events.registry import known_event_types

__all__ = ["CloudEvents", "PublisherConfig", "parse_publisher_url", "parse_publishers"]

Kind = Literal["amqp", "nats"]
_KINDS: dict[str, Kind] = {"amqp": "amqp", "amqps": "amqp", "nats": "nats", "tls": "nats"}
_OPTIONS: dict[Kind, dict[str, str]] = {
    "amqp": {"exchange": "relay.events", "max_bytes": str(16 * 1024 * 1024)},
    "nats": {"stream": "RELAY", "prefix": "relay", "create": "true"},
}
# format=cloudevents only: the event's source, the public base URL of the
# relay's /v1/schemas (for dataschema), and a reverse-DNS prefix for type.
_CLOUDEVENTS = {"source", "schemas", "type_prefix"}
_COMMON = {"name", "events", "format", *_CLOUDEVENTS}
DEFAULT_SOURCE = "/relay"


@dataclass(frozen=True)
class CloudEvents:
    """How a ``format=cloudevents`` publisher names its events (see ``cloudevent_attributes``)."""

    source: str = DEFAULT_SOURCE
    schemas: str | None = None  # None: dataschema is the schema's $id (urn:relay:schema:…)
    type_prefix: str = ""


@dataclass(frozen=True)
class PublisherConfig:
    kind: Kind
    url: str  # may carry credentials: never log it, log `name`
    name: str
    events: frozenset[str] | None = None  # None: every event type
    options: dict[str, str] = field(default_factory=dict)
    cloudevents: CloudEvents | None = None  # None: plain JSON messages, as before

    def accepts(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


def _public(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def parse_publisher_url(url: str) -> PublisherConfig:
    """One publisher's settings, or ``ConfigError`` saying exactly what is wrong."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"RELAY_PUBLISHERS: not a URL ({exc}): {_public(url)!r}") from None
    kind = _KINDS.get(parts.scheme)
    if kind is None:
        raise ConfigError(
            f"RELAY_PUBLISHERS: unsupported scheme {parts.scheme!r} in {_public(url)!r}; "
            "expected amqp://, amqps:// (RabbitMQ) or nats://, tls:// (NATS JetStream)"
        )
    if not parts.hostname:
        raise ConfigError(f"RELAY_PUBLISHERS: no host in {_public(url)!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    options = dict(_OPTIONS[kind])
    unknown = set(query) - set(options) - _COMMON
    if unknown:
        raise ConfigError(
            f"RELAY_PUBLISHERS: unknown option(s) {', '.join(sorted(unknown))} for {kind} in "
            f"{_public(url)!r}; known: {', '.join(sorted(set(options) | _COMMON))}"
        )
    events: frozenset[str] | None = None
    if query.get("events"):
        events = frozenset(e.strip() for e in query["events"].split(",") if e.strip())
        strangers = events - known_event_types()
        if strangers:
            raise ConfigError(
                f"RELAY_PUBLISHERS: unknown event type(s) {', '.join(sorted(strangers))} in "
                f"events= of {_public(url)!r}"
            )
    options.update({k: v for k, v in query.items() if k in options})
    if kind == "amqp" and not options["max_bytes"].isdigit():
        raise ConfigError(f"RELAY_PUBLISHERS: max_bytes must be a byte count in {_public(url)!r}")
    if kind == "nats" and options["create"] not in ("true", "false"):
        raise ConfigError(f"RELAY_PUBLISHERS: create must be true or false in {_public(url)!r}")
    broker_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    target = options.get("exchange") or options.get("stream")
    name = query.get("name") or f"{_public(url)}#{target}"
    cloudevents = _cloudevents(query, _public(url))
    return PublisherConfig(
        kind=kind, url=broker_url, name=name, events=events, options=options,
        cloudevents=cloudevents,
    )  # fmt: skip


def _cloudevents(query: dict[str, str], shown: str) -> CloudEvents | None:
    """``format=`` and the CloudEvents options, checked: each value becomes a header."""
    form = query.get("format", "json")
    if form not in ("json", "cloudevents"):
        raise ConfigError(
            f"RELAY_PUBLISHERS: format must be json or cloudevents, not {form!r}, in {shown!r}"
        )
    given = sorted(_CLOUDEVENTS & set(query))
    if form == "json":
        if given:
            raise ConfigError(
                f"RELAY_PUBLISHERS: {', '.join(given)} only apply with format=cloudevents "
                f"in {shown!r}"
            )
        return None
    for option in given:
        value = query[option]
        if not value or any(c.isspace() or not c.isprintable() for c in value):
            raise ConfigError(
                f"RELAY_PUBLISHERS: {option} must be non-empty, without spaces, in {shown!r}"
            )
    schemas = query.get("schemas")
    if schemas is not None and not (urlsplit(schemas).scheme and urlsplit(schemas).netloc):
        raise ConfigError(
            f"RELAY_PUBLISHERS: schemas must be an absolute URL (where consumers reach the "
            f"relay's /v1/schemas), in {shown!r}"
        )
    return CloudEvents(
        source=query.get("source", DEFAULT_SOURCE),
        schemas=schemas,
        type_prefix=query.get("type_prefix", ""),
    )


# The client library each kind needs: optional, installed with the brokers extra.
_CLIENTS: dict[Kind, str] = {"amqp": "aio_pika", "nats": "nats"}


def _require_client(kind: Kind) -> None:
    """A missing optional client is a setting to fix, not a traceback at first use."""
    try:
        importlib.import_module(_CLIENTS[kind])
    except ImportError:
        raise ConfigError(
            f"RELAY_PUBLISHERS: {kind} publishers need the {_CLIENTS[kind]} package, "
            "which this install lacks; install it with pip install 'relay[brokers]'"
        ) from None


def parse_publishers(urls: list[str]) -> list[PublisherConfig]:
    configs = [parse_publisher_url(u) for u in urls]
    for kind in sorted({c.kind for c in configs}):
        _require_client(kind)
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"RELAY_PUBLISHERS: two publishers share the name {twice[0]!r}; "
            "give one a distinct ?name= (it keys the durable offsets)"
        )
    return configs
