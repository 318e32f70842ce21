"""Pages the local recorder hands to the hub: fanned out at once when they
follow on from what was delivered, queued (never reordered) otherwise; and
big pages fanned out in slices that no stream's buffer overflows."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from relay.gateway.hub import Hub, Subscriber
from relay.log import LogEvent, Page, Position

RESTAURANT = str(uuid.uuid4())
CHANNEL = f"restaurant:{RESTAURANT}"


def _event(at: Position, channel: str = CHANNEL) -> LogEvent:
    now = datetime.now(UTC)
    return LogEvent(
        at=at, sse_event="OrderStatusChanged", channels=(channel,), data="{}",
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


def _spread(count: int, channels: list[str]) -> list[LogEvent]:
    """``count`` events of window 6, round robin over ``channels``."""
    return [_event(Position(6, 700, i), channels[i % len(channels)]) for i in range(count)]


def test_a_page_spread_over_many_restaurants_goes_out_in_one_slice() -> None:
    hub = _hub()
    channels = [f"restaurant:{uuid.uuid4()}" for _ in range(100)]
    subs = [hub.subscribe(channel, limit=1000) for channel in channels]
    events = _spread(5000, channels)
    assert hub._fan(events) == 5000  # 50 per stream: each writes its share at once
    assert all(len(sub.frames) == 50 for sub in subs)
    assert hub.delivered == events[-1].at


def test_one_restaurant_gets_a_slice_at_a_time() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=1000)
    events = _spread(1000, [CHANNEL])
    assert hub._fan(events) == 256
    assert [e.at.id for e, _ in sub.frames] == list(range(256))
    assert hub.delivered == events[255].at


async def _drained(hub: Hub, sub: Subscriber, events: list[LogEvent]) -> list[int]:
    """Offers ``events`` while a stream takes what it is given at each turn."""
    got: list[int] = []

    async def stream() -> None:
        while len(got) < len(events) and not sub.closed:
            if await sub.wait(1.0):
                got.extend(e.at.id for e, _ in sub.take())

    reader = asyncio.create_task(stream())
    await hub._offer(events)
    await asyncio.wait_for(reader, 5)
    assert sub.closed is None, "a healthy stream was closed as slow"
    return got


async def test_a_stream_over_several_restaurants_is_never_overfilled_by_one_slice() -> None:
    hub = _hub()
    channels = [f"restaurant:{uuid.uuid4()}" for _ in range(4)]
    # Its buffer holds one slice: four channels each given a full slice would overflow it.
    sub = hub.subscribe_many(channels, limit=256)
    others = [hub.subscribe(channel, limit=1000) for channel in channels]
    events = _spread(2000, channels)
    assert await _drained(hub, sub, events) == list(range(2000))
    assert all(len(other.frames) == 500 for other in others)  # nobody took theirs: still all there


async def test_one_restaurant_never_overfills_a_stream_that_takes_its_slices() -> None:
    hub = _hub()
    sub = hub.subscribe(CHANNEL, limit=256)
    assert await _drained(hub, sub, _spread(3000, [CHANNEL])) == list(range(3000))
