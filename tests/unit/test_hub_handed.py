"""Pages the local recorder hands to the hub: fanned out at once when they
follow on from what was delivered, queued (never reordered) otherwise."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from relay.gateway.hub import Hub
from relay.log import LogEvent, Page, Position

RESTAURANT = str(uuid.uuid4())
CHANNEL = f"restaurant:{RESTAURANT}"


def _event(at: Position) -> LogEvent:
    now = datetime.now(UTC)
    return LogEvent(
        at=at, sse_event="OrderStatusChanged", channels=(CHANNEL,), data="{}",
        event_id=str(uuid.uuid4()), event_type="OrderAccepted", schema_version=1,
        restaurant_id=RESTAURANT, order_id=None, customer_id=None, occurred_on_utc=now,
        enqueued_at=now,
    )  # fmt: skip


def _page(
    window: int, ids: range, *, after: Position | None = None, reached: Position | None = None
) -> Page:
    events = [_event(Position(window, 700, i)) for i in ids]
    start = after if after is not None else Position.end_of(window - 1)
    end = reached if reached is not None else Position.end_of(window)
    return Page(start, events, [], end, len(events))


def _hub() -> Hub:
    hub = Hub("postgresql://unused")
    hub.ready.set()  # as after its start, at window 5
    hub.delivered = Position.end_of(5)
    return hub


def test_a_page_that_follows_on_reaches_the_streams_at_once() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=100)
    hub.handed(_page(6, range(1, 4)))
    assert [e.at.id for e, _ in sub.frames] == [1, 2, 3]
    assert hub.delivered == Position.end_of(6)
    assert hub._work.empty()


def test_what_was_delivered_already_is_not_sent_again() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=100)
    hub.handed(_page(6, range(1, 3), reached=Position(6, 700, 2)))  # a full first page
    assert hub.delivered == Position(6, 700, 2)
    # A page that starts before what was delivered (a re-read) adds only the rest.
    hub.handed(_page(6, range(1, 5)))
    assert [e.at.id for e, _ in sub.frames] == [1, 2, 3, 4]
    assert hub.delivered == Position.end_of(6)


def test_a_page_beyond_a_gap_or_behind_queued_work_waits_its_turn() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=100)
    hub.handed(_page(8, range(1, 3)))  # windows 6 and 7 not delivered: a read first
    assert sub.frames == [] and hub._work.qsize() == 1
    hub.delivered = Position.end_of(7)  # even once it would follow on,
    hub.handed(_page(9, range(1, 3), after=Position.end_of(8)))  # work queued comes first
    assert sub.frames == [] and hub._work.qsize() == 2


def test_nothing_overtakes_work_the_hub_is_applying() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=100)
    hub._applying = True  # e.g. reading a gap from the log
    hub.handed(_page(6, range(1, 3)))
    assert sub.frames == [] and hub._work.qsize() == 1
