"""The SLA watcher's deadline rules, step by step against a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from relay import log as event_log
from relay.log import Position
from relay.outbox import enqueue
from relay.sla import SLA, SlaConfig, SlaWatcher
from relay.sql import query
from tests.helpers.orders import CHAIN, event

# In the future: a deadline already due would be raised (and deleted) by the same step.
AT = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
CONFIG = SlaConfig(
    not_accepted=timedelta(minutes=3),
    not_ready=timedelta(minutes=25),
    delivery_grace=timedelta(minutes=5),
    page_size=2,  # small pages: the watcher must loop until the log is applied
)


def _record(url: str) -> int:
    """Record a window now, as the recorder would: every committed row so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query("record_window")).fetchone()
    assert row is not None
    return int(row[0])


def _enqueue(url: str, events: list[Any]) -> None:
    with psycopg.connect(url) as producer:
        for e in events:
            enqueue(producer, e)


async def _step(url: str, watcher: SlaWatcher | None = None) -> int:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        return await (watcher or SlaWatcher(url, CONFIG)).step(conn)
    finally:
        await conn.close()


def _deadlines(url: str) -> dict[uuid.UUID, tuple[str, datetime]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT order_id, kind, due_at FROM relay_sla_deadlines").fetchall()
    return {order: (kind, due) for order, kind, due in rows}


def _alerts(url: str) -> list[tuple[uuid.UUID, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT order_id, payload->>'kind' FROM relay_outbox"
            " WHERE event_type = 'OrderDelayAlert' AND derived ORDER BY id"
        ).fetchall()
    return [(order, kind) for order, kind in rows]


async def _publish_and_step(url: str, events: list[Any]) -> dict[uuid.UUID, tuple[str, datetime]]:
    _enqueue(url, events)
    _record(url)
    await _step(url)
    return _deadlines(url)


async def _sla_offset(url: str) -> tuple[Position | None, Position]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        return await event_log.read_offset(conn, SLA), (await event_log.head(conn)).end
    finally:
        await conn.close()


async def test_each_event_sets_replaces_or_clears_the_order_deadline(database_url: str) -> None:
    restaurant = uuid.uuid4()
    paid, accepted, ready, preparing, delivered, no_estimate = (uuid.uuid4() for _ in range(6))
    e: dict[str, Any] = {"restaurant_id": restaurant, "at": AT}
    deadlines = await _publish_and_step(
        database_url,
        [
            event("OrderPaymentSucceeded", order_id=paid, **e),
            event("OrderPaymentSucceeded", order_id=accepted, **e),
            event("OrderAccepted", order_id=accepted, **e),
            event("OrderAccepted", order_id=ready, **e),
            event("OrderReadyForDelivery", order_id=ready, **e),
            event("OrderAccepted", order_id=preparing, **e),
            event("OrderPreparing", order_id=preparing, **e),  # keeps NotReady
            event("OrderAccepted", order_id=delivered, **e),
            event("OrderDelivered", order_id=delivered, **e),
        ],
    )
    assert deadlines[paid] == ("NotAccepted", AT + timedelta(minutes=3))
    assert deadlines[accepted] == ("NotReady", AT + timedelta(minutes=25))
    # Ready: due at estimatedDeliveryTime (AT + 30 min in the helper) plus the grace.
    assert deadlines[ready] == ("DeliveryLate", AT + timedelta(minutes=35))
    assert deadlines[preparing] == ("NotReady", AT + timedelta(minutes=25))
    assert delivered not in deadlines
    # A ready event without an estimate clears the order's deadline.
    with_estimate = event("OrderReadyForDelivery", order_id=no_estimate, **e)
    ready_event = dataclasses.replace(
        with_estimate,
        payload={k: v for k, v in with_estimate.payload.items() if k != "estimatedDeliveryTime"},
    )
    deadlines = await _publish_and_step(
        database_url, [event("OrderAccepted", order_id=no_estimate, **e), ready_event]
    )
    assert no_estimate not in deadlines
    offset, end = await _sla_offset(database_url)
    assert offset == end  # every recorded event was applied


async def test_per_restaurant_thresholds_override_the_defaults(database_url: str) -> None:
    strict, relaxed = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO relay_sla_thresholds (restaurant_id, not_accepted)"
            " VALUES (%s, '1 minute')",
            (strict,),
        )
    a, b = uuid.uuid4(), uuid.uuid4()
    deadlines = await _publish_and_step(
        database_url,
        [
            event("OrderPaymentSucceeded", restaurant_id=strict, order_id=a, at=AT),
            event("OrderPaymentSucceeded", restaurant_id=relaxed, order_id=b, at=AT),
        ],
    )
    assert deadlines[a] == ("NotAccepted", AT + timedelta(minutes=1))
    assert deadlines[b] == ("NotAccepted", AT + timedelta(minutes=3))


async def test_only_events_in_windows_count_and_a_second_replica_skips(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant,
                                  order_id=order, at=AT)])  # fmt: skip
    await _step(database_url)
    assert _deadlines(database_url) == {}  # committed, but in no window yet
    _record(database_url)
    holder = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        async with holder.transaction():
            assert await event_log.take_offset(holder, SLA) is not None
            assert await _step(database_url) == 0  # the other replica holds the watcher
            assert _deadlines(database_url) == {}
    finally:
        await holder.close()
    await _step(database_url)
    assert _deadlines(database_url) == {order: ("NotAccepted", AT + timedelta(minutes=3))}


async def test_a_due_deadline_waits_for_the_orders_unread_rows(database_url: str) -> None:
    restaurant, late, answered, customer = (uuid.uuid4() for _ in range(4))
    past = datetime.now(UTC) - timedelta(minutes=10)  # NotAccepted was due 7 minutes ago
    _enqueue(
        database_url,
        [
            event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=late,
                  customer_id=customer, at=past),
            event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=answered, at=past),
        ],
    )  # fmt: skip
    _record(database_url)
    # The awaited event has committed, but no window holds it yet.
    _enqueue(database_url, [event("OrderAccepted", restaurant_id=restaurant, order_id=answered)])
    assert await _step(database_url) == 1
    assert _alerts(database_url) == [(late, "NotAccepted")]
    assert answered in _deadlines(database_url)  # still waiting, not raised
    _record(database_url)
    assert await _step(database_url) == 0
    assert _deadlines(database_url)[answered][0] == "NotReady"
    _record(database_url)  # the alert row's own window
    assert await _step(database_url) == 0
    assert _alerts(database_url) == [(late, "NotAccepted")]  # exactly once
    with psycopg.connect(database_url) as conn:
        owner = conn.execute(
            "SELECT customer_id FROM relay_outbox WHERE event_type = 'OrderDelayAlert'"
        ).fetchone()
    assert owner == (customer,)  # the customer's order stream may carry the notice


async def test_the_guard_counts_rows_after_a_mid_window_offset(database_url: str) -> None:
    # Two orders' events in one transaction, so one window; the watcher's
    # offset stops between them (a crash mid-window): the second is unread.
    restaurant, first, second = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    _enqueue(
        database_url,
        [
            event("OrderPreparing", restaurant_id=restaurant, order_id=first),
            event("OrderPreparing", restaurant_id=restaurant, order_id=second),
        ],
    )
    window = _record(database_url)
    with psycopg.connect(database_url) as conn:
        (xid, first_id), _ = conn.execute(
            "SELECT xid::text::bigint, id FROM relay_outbox ORDER BY id"
        ).fetchall()
        conn.execute(
            "INSERT INTO relay_sla_deadlines (order_id, restaurant_id, kind, due_at)"
            " SELECT o, %s, 'NotReady', now() - interval '1 minute' FROM unnest(%s::uuid[]) AS o",
            (restaurant, [first, second]),
        )
        conn.execute(
            "UPDATE relay_offsets SET window_id = %s, xid = %s, id = %s WHERE follower = %s",
            (window, xid, first_id, SLA),
        )
        raised = conn.execute(query("sla_raise_due"), {"limit": 100}).fetchall()
    assert raised == [(first, "NotReady")]


async def test_deadline_writes_per_event_on_a_realistic_order_mix(database_url: str) -> None:
    """The watcher writes deadline rows, never one per event: measure how many.

    Orders take minutes, so each step usually sees one event of an order
    (worst case); a backlog sees several and keeps only the last.
    """
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(50)]
    chain = ["OrderPaymentSucceeded", *CHAIN]
    spread = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1000))
    for kind in chain:  # one step per stage: every event in a window of its own stage
        _enqueue(database_url, [event(kind, restaurant_id=restaurant, order_id=o, at=AT)
                                for o in orders])  # fmt: skip
        _record(database_url)
        await _step(database_url, spread)
    assert spread.events == len(orders) * len(chain)
    # Paid, accepted and ready each write the deadline, delivered deletes it;
    # preparing writes nothing: 4 writes for 5 events.
    assert spread.writes == len(orders) * 4
    assert _deadlines(database_url) == {}

    burst = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1000))
    more = [uuid.uuid4() for _ in range(50)]
    _enqueue(database_url, [event(kind, restaurant_id=restaurant, order_id=o, at=AT)
                            for o in more for kind in chain])  # fmt: skip
    _record(database_url)
    await _step(database_url, burst)
    assert burst.events == len(more) * len(chain)
    assert burst.writes == 0  # each order's last event clears a deadline it never had


async def test_a_backlog_is_applied_in_bounded_steps(database_url: str) -> None:
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(5)]
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=o,
                                  at=AT) for o in orders])  # fmt: skip
    _record(database_url)
    watcher = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1, step_pages=2))
    await _step(database_url, watcher)
    assert watcher.behind and len(_deadlines(database_url)) == 2
    steps = 1
    while watcher.behind:
        await _step(database_url, watcher)
        steps += 1
    assert set(_deadlines(database_url)) == set(orders) and steps == 3


async def test_pages_handed_by_the_recorder_give_the_deadlines_a_read_of_the_log_gives(
    database_url: str,
) -> None:
    """In the recorder's process the watcher takes the pages the recorder read
    instead of reading and validating them again; pages that do not continue
    its offset are passed over. Either way the deadlines are the same."""
    url = database_url
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(3)]
    kinds = ["OrderPaymentSucceeded", "OrderAccepted", "OrderReadyForDelivery"]
    _enqueue(
        url,
        [
            event(k, restaurant_id=restaurant, order_id=o, at=AT)
            for o, k in zip(orders, kinds, strict=True)
        ],
    )
    window = _record(url)
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        page = await event_log.read(conn, Position.end_of(0), window, limit=1000)
    finally:
        await conn.close()
    assert len(page.events) == 3
    handed = SlaWatcher(url, dataclasses.replace(CONFIG, page_size=1000))
    stale = dataclasses.replace(page, after=Position.end_of(-1), reached=Position.end_of(0))
    handed.handed(stale)  # already behind the offset: dropped
    handed.handed(page)
    await _step(url, handed)
    assert not handed._handed  # both consumed: the stale one dropped, the other applied
    by_hand = _deadlines(url)
    assert {o: kind for o, (kind, _due) in by_hand.items()} == {
        orders[0]: "NotAccepted",
        orders[1]: "NotReady",
        orders[2]: "DeliveryLate",
    }
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DELETE FROM relay_sla_deadlines")
        c.execute(
            "UPDATE relay_offsets SET window_id = 0, xid = %s, id = %s WHERE follower = %s",
            (2**63 - 1, 2**63 - 1, SLA),
        )
    await _step(url, SlaWatcher(url, dataclasses.replace(CONFIG, page_size=1000)))
    assert _deadlines(url) == by_hand
