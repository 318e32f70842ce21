"""The backplane's messages: a page of the log out and back unchanged, cut to
the server's size, a gap left where an event can never fit, and a message a
gateway cannot trust refused rather than half-applied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from relay.backplane.codec import (
    AFTER,
    REACHED,
    Chunk,
    decode,
    encode,
    parse_backplane_url,
    parse_position,
    position_text,
)
from relay.errors import ConfigError
from relay.log import ORIGIN, LogEvent, Page, Position

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _event(window: int, row: int, data: str = '{"status":"Accepted"}') -> LogEvent:
    return LogEvent(
        at=Position(window, 700 + window, row),
        sse_event="orderAccepted",
        channels=("restaurant:r1", "order:r1:o1", "admin"),
        data=data,
        event_id=f"00000000-0000-0000-0000-{row:012d}",
        event_type="OrderAccepted",
        schema_version=1,
        restaurant_id="r1",
        order_id=None if row % 2 else "o1",
        customer_id="c1" if row % 3 == 0 else None,
        occurred_on_utc=T0 + timedelta(microseconds=row),
        enqueued_at=T0 + timedelta(seconds=1, microseconds=row),
    )


def _page(after: Position, events: list[LogEvent], reached: Position) -> Page:
    return Page(after, events, [], reached, len(events))


def _roundtrip(chunk: Chunk) -> tuple[Position, Position, tuple[LogEvent, ...]]:
    return decode(chunk.headers[AFTER], chunk.headers[REACHED], chunk.body)


def test_a_page_comes_back_as_it_went_out_from_the_origin_on() -> None:
    events = [_event(1, i, data='{"note":"naïve \\"quoted\\" ✓"}') for i in range(1, 6)]
    chunks = list(encode(_page(ORIGIN, events, Position.end_of(1)), 1 << 20))
    assert len(chunks) == 1
    assert _roundtrip(chunks[0]) == (ORIGIN, Position.end_of(1), tuple(events))


def test_a_page_without_events_still_carries_how_far_the_log_reaches() -> None:
    (chunk,) = encode(_page(Position.end_of(3), [], Position.end_of(9)), 1 << 20)
    assert _roundtrip(chunk) == (Position.end_of(3), Position.end_of(9), ())


def test_a_large_page_is_cut_into_consecutive_messages_within_the_size() -> None:
    events = [_event(2, i) for i in range(1, 200)]
    chunks = list(encode(_page(Position.end_of(1), events, Position.end_of(2)), 4096))
    assert len(chunks) > 5
    assert all(len(c.body) <= 4096 for c in chunks)
    decoded = [_roundtrip(c) for c in chunks]
    assert decoded[0][0] == Position.end_of(1)
    assert decoded[-1][1] == Position.end_of(2)
    for (_a, reached, _e), (after, _r, _e2) in pairwise(decoded):
        assert after == reached  # each message starts where the one before ended
    assert [e for _a, _r, part in decoded for e in part] == events


def test_an_event_too_large_for_any_message_is_left_as_a_gap_gateways_read() -> None:
    small, huge, after_huge = _event(4, 1), _event(4, 2, '{"x":"' + "y" * 5000 + '"}'), _event(4, 3)
    chunks = list(encode(_page(Position.end_of(3), [small, huge, after_huge],
                               Position.end_of(4)), 4096))  # fmt: skip
    decoded = [_roundtrip(c) for c in chunks]
    assert [e for _a, _r, part in decoded for e in part] == [small, after_huge]
    # The message after the gap starts at the huge event: a gateway that
    # delivered ``small`` sees it does not follow on, and reads the log.
    assert decoded[0][1] == small.at
    assert decoded[1][0] == huge.at


def test_the_stretch_names_the_message_so_a_republished_page_is_deduplicated() -> None:
    page = _page(Position.end_of(5), [_event(6, 1)], Position.end_of(6))
    (first,), (again,) = list(encode(page, 1 << 20)), list(encode(page, 1 << 20))
    assert first.headers["Nats-Msg-Id"] == again.headers["Nats-Msg-Id"]
    assert (
        first.headers["Nats-Msg-Id"]
        != next(iter(encode(_page(Position.end_of(6), [], Position.end_of(7)), 1 << 20))).headers[
            "Nats-Msg-Id"
        ]
    )


@pytest.mark.parametrize("position", [ORIGIN, Position(0, 1, 2), Position.end_of(10**12)])
def test_positions_print_and_parse_back(position: Position) -> None:
    assert parse_position(position_text(position)) == position


_FIELDS = '"e",[],"i","t",1,"r",null,null'
_WHEN = '"2026-01-01T00:00:00+00:00"'


@pytest.mark.parametrize(
    ("after", "reached", "body", "why"),
    [
        ("1.2", "2.3.4", b"[]", "not a position"),
        ("x.y.z", "2.3.4", b"[]", "not numbers"),
        ("5.0.0", "4.0.0", b"[]", "ends before it starts"),
        ("1.0.0", "2.0.0", b"{", "not JSON"),
        ("1.0.0", "2.0.0", b'[["too", "short"]]\n{}', "not an event"),
        ("1.0.0", "2.0.0", f"[[1,5,1,{_FIELDS},{_WHEN},{_WHEN}]]".encode(), "no data line"),
        ("1.0.0", "2.0.0", f"[[1,5,1,{_FIELDS},{_WHEN},{_WHEN}]]\n{{}}\n{{}}".encode(),
         "a data line too many"),
        ("1.0.0", "2.0.0", f"[[3,0,1,{_FIELDS},{_WHEN},{_WHEN}]]\n{{}}".encode(),
         "an event outside the stretch"),
        ("1.0.0", "2.0.0", f'[[1,5,1,{_FIELDS},"yesterday",{_WHEN}]]\n{{}}'.encode(),
         "a bad timestamp"),
        ("1.0.0", "2.0.0", f"[[1,5,1,{_FIELDS},{_WHEN},{_WHEN}]]\n\xff".encode("latin-1"),
         "data that is not UTF-8"),
    ],
)  # fmt: skip
def test_a_malformed_message_is_refused_whole(after: str, reached: str, body: bytes,
                                              why: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match="backplane message"):
        decode(after, reached, body)


def test_a_well_formed_message_of_the_same_shape_is_accepted() -> None:
    """The cases above fail for their stated reason, not for their shape."""
    body = f"[[1,5,1,{_FIELDS},{_WHEN},{_WHEN}]]\n{{}}".encode()
    _start, _end, (event,) = decode("1.0.0", "2.0.0", body)
    assert (event.at, event.data, event.order_id) == (Position(1, 5, 1), "{}", None)


def test_a_backplane_url_names_its_stream_and_subject() -> None:
    config = parse_backplane_url("nats://user:pw@nats.internal:4222?stream=LIVE&prefix=orders.live")
    assert (config.stream, config.subject, config.max_age) == ("LIVE", "orders.live.log", 300.0)
    assert "pw" not in config.name
    assert config.name == "nats://nats.internal:4222"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("amqp://rabbit:5672", "nats:// or tls://"),
        ("nats://", "with a host"),
        ("nats://n:99999", "not a URL"),
        ("nats://n:4222?stream=A&retention=1", "unknown option(s) retention"),
        ("nats://n:4222?max_age=soon", "max_age must be a number"),
        ("nats://n:4222?max_age=0", "max_age must be positive"),
        ("nats://n:4222?prefix=a.*", "prefix 'a.*' is not a valid name"),
    ],
)
def test_a_bad_backplane_url_says_what_is_wrong(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_BACKPLANE") as caught:
        parse_backplane_url(url)
    assert needle in str(caught.value)
