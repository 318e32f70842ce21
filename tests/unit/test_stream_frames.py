"""Which of a wake-up's events a stream sends: those after its position, each
once, whether the buffer is all new (sent whole) or begins among events the
stream has already sent (a replay meeting the live tail)."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.gateway.hub import frame
from relay.gateway.streams import _above, _Plan
from relay.log import LogEvent, Position, Selector

WHEN = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
KITCHEN = "restaurant:r"
ORDER = "order:r:o"


def _event(row: int, *channels: str) -> LogEvent:
    return LogEvent(Position(7, 900, row), "OrderStatusChanged", channels, f'{{"n":{row}}}',
                    f"e{row}", "OrderAccepted", 1, "r", "o", None, WHEN, WHEN)  # fmt: skip


def _items(rows: range, *channels: str) -> list[tuple[LogEvent, bytes | None]]:
    return [(e, frame(e)) for e in (_event(row, *channels) for row in rows)]


def test_an_all_new_buffer_is_sent_whole() -> None:
    plan = _Plan((KITCHEN,), Selector())
    items = _items(range(1, 4), KITCHEN, ORDER)
    chunk, sent = _above(plan, Position(7, 900, 0), items)
    assert chunk == b"".join(f for _e, f in items if f is not None)
    assert sent == Position(7, 900, 3)


def test_a_buffer_that_begins_among_sent_events_sends_only_the_rest() -> None:
    plan = _Plan((KITCHEN,), Selector())
    items = _items(range(1, 6), KITCHEN)
    chunk, sent = _above(plan, Position(7, 900, 2), items)
    assert chunk == b"".join(f for _e, f in items[2:] if f is not None)
    assert sent == Position(7, 900, 5)


def test_events_without_a_shared_frame_get_their_own() -> None:
    plan = _Plan((KITCHEN,), Selector())
    events = [_event(row, KITCHEN) for row in (1, 2)]
    chunk, _sent = _above(plan, Position(7, 900, 0), [(e, None) for e in events])
    assert chunk == b"".join(frame(e) for e in events)


def test_an_event_on_two_followed_channels_is_sent_once() -> None:
    plan = _Plan((KITCHEN, ORDER), Selector())
    first, second = _event(1, KITCHEN, ORDER), _event(2, KITCHEN)
    offered = [(first, frame(first)), (first, frame(first)), (second, frame(second))]
    chunk, sent = _above(plan, Position(7, 900, 0), offered)
    assert chunk == frame(first) + frame(second)
    assert sent == second.at
