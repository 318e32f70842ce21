"""The hub's memory of recent events: what a replay from it may and may not answer."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from relay.gateway.recent import Recalled, Recent
from relay.log import LogEvent, Position

A, B = "restaurant:a", "restaurant:b"


def _event(n: int, *channels: str) -> LogEvent:
    now = datetime.now(UTC)
    return LogEvent(
        at=Position(1, 700, n), sse_event="OrderStatusChanged", channels=channels,
        data=f'{{"n":{n}}}', event_id=str(uuid.uuid4()), event_type="OrderAccepted",
        schema_version=1, restaurant_id=str(uuid.uuid4()), order_id=None, customer_id=None,
        occurred_on_utc=now, enqueued_at=now,
    )  # fmt: skip


def _ids(events: list[Recalled] | None) -> list[int] | None:
    return None if events is None else [e.at.id for e in events]


def test_a_replay_gets_its_channels_events_after_the_cursor_in_log_order() -> None:
    recent = Recent(100)
    recent.reset(Position.end_of(0))
    recent.add([_event(1, A, "order:a:1"), _event(2, B), _event(3, A), _event(4, B, A)])
    recent.reach(Position.end_of(1))
    assert recent.end == Position.end_of(1)
    assert _ids(recent.since([A], Position.end_of(0))) == [1, 3, 4]
    assert _ids(recent.since([A], Position(1, 700, 1))) == [3, 4]
    assert _ids(recent.since([A, B], Position.end_of(0))) == [1, 2, 3, 4]  # 4 once
    assert _ids(recent.since(["order:a:1"], Position.end_of(0))) == [1]
    assert recent.since(["restaurant:none"], Position.end_of(0)) == []


def test_memory_answers_nothing_it_cannot_answer_whole() -> None:
    recent = Recent(100)
    recent.reset(Position.end_of(1))
    recent.add([_event(5, A)])
    assert recent.since([A], Position.end_of(0)) is None  # before what it saw
    assert recent.since([A], Position(1, 700, 6)) is None  # after what it saw
    customer = Recent(100)
    customer.add([_event(1, A, "customer:c")])
    assert customer.since(["customer:c"], Position.end_of(-1)) == []  # never kept
    off = Recent(0)
    off.add([_event(1, A)])
    assert off.since([A], Position.end_of(-1)) is None


def test_eviction_moves_the_start_and_memory_stays_bounded() -> None:
    recent = Recent(10)
    recent.reset(Position.end_of(0))
    for n in range(1, 101):
        recent.add([_event(n, A, f"order:a:{n}")])
    assert len(recent) == 10
    assert recent.start == Position(1, 700, 90)
    assert recent.since([A], Position(1, 700, 89)) is None
    assert _ids(recent.since([A], Position(1, 700, 90))) == list(range(91, 101))
    # Evicted events leave the channels' lists too, a capacity's worth at a
    # time; order channels have no list of their own.
    assert list(recent._by_channel) == [A]
    assert _ids(recent.since(["order:a:95"], Position(1, 700, 90))) == [95]
    assert sum(len(kept) for kept in recent._by_channel.values()) <= 2 * 2 * 10


def test_a_reset_forgets_everything() -> None:
    recent = Recent(10)
    recent.add([_event(1, A)])
    recent.reset(Position.end_of(5))
    assert recent.since([A], Position.end_of(5)) == []
    assert recent.since([A], Position.end_of(4)) is None


def test_pages_of_any_size_replay_what_a_plain_list_would() -> None:
    """Pages smaller and larger than the capacity, over a few channels: every
    answer is the reference's (the last ``capacity`` events, filtered), and
    memory stays within twice the capacity."""
    rng = random.Random(7)
    recent, delivered = Recent(50), []
    recent.reset(Position.end_of(0))
    n = 0
    for _ in range(300):
        page = []
        for _ in range(rng.choice([1, 3, 20, 49, 50, 51, 130])):
            n += 1
            kitchen = rng.choice([A, B])
            page.append(_event(n, kitchen, f"order:{kitchen[-1]}:{n % 7}"))
        recent.add(page)
        delivered += page
        kept = delivered[-50:]
        if len(delivered) <= 52:
            continue
        assert len(recent) == len(kept) and recent.start == delivered[-51].at
        assert recent.since([A], delivered[-52].at) is None
        for after in (kept[0].at, kept[len(kept) // 2].at, kept[-1].at):
            expected = [e.at.id for e in kept if A in e.channels and e.at > after]
            assert _ids(recent.since([A], after)) == expected
            both = [e.at.id for e in kept if e.at > after]
            assert _ids(recent.since([A, B], after)) == both
            for order in ("order:a:3", "order:b:3", "order:a:9"):  # from its restaurant's list
                mine = [e.at.id for e in kept if order in e.channels and e.at > after]
                assert _ids(recent.since([order], after)) == mine
            assert _ids(recent.since([B, "order:a:3"], after)) == sorted(
                e.at.id for e in kept if {B, "order:a:3"} & set(e.channels) and e.at > after
            )
        assert len(recent._kept) <= 2 * 50 + 130
        assert sum(len(k) for k in recent._by_channel.values()) <= 2 * 2 * (2 * 50 + 130)
