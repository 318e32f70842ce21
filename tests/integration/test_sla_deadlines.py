"""The SLA watcher's deadline rules, step by step against a real PostgreSQL.

Open deadlines live in the watcher's memory. Most steps here use a new
watcher, which rebuilds that memory from the log: every check below is also
a check that a rebuild gives what the running watcher had.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from relay import log as event_log
from relay.log import Position
from relay.maintenance import prune
from relay.outbox import enqueue
from relay.sla import REPLAY, SLA, SlaConfig, SlaWatcher
from relay.sql import query
from tests.helpers.orders import CHAIN, event

# In the future: a deadline already due would be raised by the same step.
AT = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
CONFIG = SlaConfig(
    not_accepted=timedelta(minutes=3),
    not_ready=timedelta(minutes=25),
    delivery_grace=timedelta(minutes=5),
    park_beyond=timedelta(days=7),  # AT's deadlines stay in memory
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


def _open(watcher: SlaWatcher) -> set[uuid.UUID]:
    """The orders with an open deadline in the watcher's memory."""
    return {uuid.UUID(order) for order in watcher.deadlines()}


async def _deadlines(url: str, config: SlaConfig = CONFIG) -> dict[uuid.UUID, tuple[str, datetime]]:
    """The open deadlines as a new watcher rebuilds them (one step)."""
    watcher = SlaWatcher(url, config)
    await _step(url, watcher)
    return {uuid.UUID(order): (d.kind, d.due) for order, d in watcher.deadlines().items()}


def _parked(url: str) -> dict[uuid.UUID, tuple[str, datetime]]:
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
    return await _deadlines(url)


async def _offsets(url: str) -> tuple[Position | None, Position | None, Position]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        sla = await event_log.read_offset(conn, SLA)
        replay = await event_log.read_offset(conn, REPLAY)
        return sla, replay, (await event_log.head(conn)).end
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
    offset, _, end = await _offsets(database_url)
    assert offset == end  # every recorded event was applied
    assert _parked(database_url) == {}  # nothing written for any of them


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
    assert await _deadlines(database_url) == {}  # committed, but in no window yet
    _record(database_url)
    holder = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        async with holder.transaction():
            assert await event_log.take_offset(holder, SLA) is not None
            skipped = SlaWatcher(database_url, CONFIG)
            assert await _step(database_url, skipped) == 0  # the other replica holds it
            assert skipped.deadlines() == {}
    finally:
        await holder.close()
    assert await _deadlines(database_url) == {order: ("NotAccepted", AT + timedelta(minutes=3))}


async def test_a_watcher_that_does_not_lead_keeps_no_memory(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant,
                                  order_id=order, at=AT)])  # fmt: skip
    _record(database_url)
    leading = True
    checked = Position.end_of(10**6)  # the local check is far ahead: no limit
    watcher = SlaWatcher(database_url, CONFIG, local_check=lambda: checked if leading else None)
    await _step(database_url, watcher)
    assert _open(watcher) == {order}
    leading = False
    assert await _step(database_url, watcher) == 0
    assert watcher.deadlines() == {}  # it would go stale while another replica leads
    leading = True
    await _step(database_url, watcher)
    assert _open(watcher) == {order} and watcher.rebuilds == 2


async def test_the_watcher_never_reads_ahead_of_the_local_check(database_url: str) -> None:
    """Beside a recorder that leads, the watcher stops where the check has
    handed the log over (a backlog is read once, by the check), and goes on
    when the check does."""
    restaurant, first, second = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant,
                                  order_id=first, at=AT)])  # fmt: skip
    checked = Position.end_of(_record(database_url))
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant,
                                  order_id=second, at=AT)])  # fmt: skip
    newest = Position.end_of(_record(database_url))
    big_pages = dataclasses.replace(CONFIG, page_size=1000)  # a page could hold both
    watcher = SlaWatcher(database_url, big_pages, local_check=lambda: checked)
    await _step(database_url, watcher)
    assert _open(watcher) == {first} and not watcher.behind
    offset, _, _ = await _offsets(database_url)
    assert offset == checked
    checked = newest
    await _step(database_url, watcher)
    assert _open(watcher) == {first, second}


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
    watcher = SlaWatcher(database_url, CONFIG)
    assert await _step(database_url, watcher) == 1
    assert _alerts(database_url) == [(late, "NotAccepted")]
    assert watcher.deadlines()[str(answered)].kind == "NotAccepted"  # still waiting, not raised
    assert str(late) not in watcher.deadlines()
    _record(database_url)
    assert await _step(database_url, watcher) == 0
    assert watcher.deadlines()[str(answered)].kind == "NotReady"
    _record(database_url)  # the alert row's own window
    assert await _step(database_url, watcher) == 0
    assert await _step(database_url) == 0  # a rebuilt watcher reads the alert: nothing twice
    assert _alerts(database_url) == [(late, "NotAccepted")]  # exactly once
    with psycopg.connect(database_url) as conn:
        owner = conn.execute(
            "SELECT customer_id FROM relay_outbox WHERE event_type = 'OrderDelayAlert'"
        ).fetchone()
    assert owner == (customer,)  # the customer's order stream may carry the notice


async def test_a_rebuild_before_the_alert_is_read_raises_nothing_twice(database_url: str) -> None:
    """A leader raises and dies before any window holds its alert: the next
    one rebuilds the same due deadline. It waits (the alert is an unread row
    of the order), then reads the alert, which closes the deadline."""
    restaurant, waiting, order = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    past = datetime.now(UTC) - timedelta(minutes=10)
    _enqueue(database_url, [
        # An older order still open keeps the replay point before the late one.
        event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=waiting, at=AT),
        event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=order, at=past),
    ])  # fmt: skip
    _record(database_url)
    assert await _step(database_url) == 1
    successor = SlaWatcher(database_url, CONFIG)
    assert await _step(database_url, successor) == 0
    assert str(order) in successor.deadlines()  # rebuilt, held back by the unread alert
    _record(database_url)
    assert await _step(database_url, successor) == 0
    assert _open(successor) == {waiting}
    assert _alerts(database_url) == [(order, "NotAccepted")]


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
    due = datetime.now(UTC) - timedelta(minutes=1)
    with psycopg.connect(database_url) as conn:
        (xid, first_id), _ = conn.execute(
            "SELECT xid::text::bigint, id FROM relay_outbox ORDER BY id"
        ).fetchall()
        conn.execute(
            "UPDATE relay_offsets SET window_id = %s, xid = %s, id = %s WHERE follower = %s",
            (window, xid, first_id, SLA),
        )
        raised = conn.execute(
            query("sla_raise"),
            {
                "orders": [first, second],
                "restaurants": [restaurant] * 2,
                "customers": [None] * 2,
                "numbers": [None] * 2,
                "kinds": ["NotReady"] * 2,
                "due": [due] * 2,
            },
        ).fetchall()
    assert raised == [(str(first), "NotReady", True)]


async def test_no_write_per_event_on_a_realistic_order_mix(database_url: str) -> None:
    """Orders pass through every stage; the watcher writes no deadline row,
    and the replay point follows the oldest order still open."""
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(50)]
    chain = ["OrderPaymentSucceeded", *CHAIN]
    watcher = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1000))
    for kind in chain:  # one step per stage: every event in a window of its own stage
        _enqueue(database_url, [event(kind, restaurant_id=restaurant, order_id=o, at=AT)
                                for o in orders])  # fmt: skip
        _record(database_url)
        await _step(database_url, watcher)
        if kind == "OrderPaymentSucceeded":
            _, replay, _ = await _offsets(database_url)
            assert replay is not None and replay < Position.end_of(_record(database_url))
    assert watcher.events == len(orders) * len(chain)
    assert watcher.writes == 0 and _parked(database_url) == {}
    assert watcher.deadlines() == {}
    offset, replay, _ = await _offsets(database_url)
    assert replay == offset  # nothing open: a rebuild reads nothing again


async def test_a_rebuild_reads_the_log_again_only_from_the_oldest_open_deadline(
    database_url: str,
) -> None:
    restaurant = uuid.uuid4()
    old, closed, young = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    e: dict[str, Any] = {"restaurant_id": restaurant, "at": AT}
    watcher = SlaWatcher(database_url, CONFIG)
    _enqueue(database_url, [event("OrderPaymentSucceeded", order_id=old, **e)])
    _enqueue(database_url, [event("OrderPaymentSucceeded", order_id=closed, **e)])
    _record(database_url)
    await _step(database_url, watcher)
    _, replay_with_old, _ = await _offsets(database_url)
    _enqueue(database_url, [event("OrderCancelled", order_id=old, **e),
                            event("OrderPaymentSucceeded", order_id=young, **e)])  # fmt: skip
    _record(database_url)
    await _step(database_url, watcher)
    _, replay, end = await _offsets(database_url)
    assert replay is not None and replay_with_old is not None
    assert replay_with_old < replay < end  # moved to `closed`, the oldest still open
    rebuilt = SlaWatcher(database_url, CONFIG)
    await _step(database_url, rebuilt)
    assert rebuilt.deadlines() == watcher.deadlines()
    assert _open(rebuilt) == {closed, young}


async def test_far_deadlines_are_parked_and_survive_the_log_being_pruned(
    database_url: str,
) -> None:
    """A delivery estimate days ahead: its deadline is stored, so the replay
    point need not stay behind it (retention may cut its event)."""
    restaurant, far, near = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    config = dataclasses.replace(CONFIG, park_beyond=timedelta(hours=12))
    _enqueue(database_url, [
        event("OrderReadyForDelivery", restaurant_id=restaurant, order_id=far, at=AT),
    ])  # fmt: skip
    _record(database_url)
    await _step(database_url, SlaWatcher(database_url, config))
    due = AT + timedelta(minutes=35)
    assert _parked(database_url) == {far: ("DeliveryLate", due)}
    _, replay, end = await _offsets(database_url)
    assert replay == end  # nothing in memory only

    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        await conn.execute("UPDATE relay_windows SET recorded_at = now() - interval '2 days'")
        assert await prune(conn, timedelta(days=1)) == 1  # the ready event is gone
    finally:
        await conn.close()
    assert await _deadlines(database_url, config) == {far: ("DeliveryLate", due)}

    now = datetime.now(UTC)
    _enqueue(database_url, [
        event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=near, at=now),
        event("OrderDelivered", restaurant_id=restaurant, order_id=far, at=now),
    ])  # fmt: skip
    _record(database_url)
    await _step(database_url, SlaWatcher(database_url, config))
    assert _parked(database_url) == {}  # delivered: its row goes
    assert set(await _deadlines(database_url, config)) == {near}  # in memory only


async def test_deadlines_stored_before_the_upgrade_are_still_raised(database_url: str) -> None:
    """A relay that kept every deadline in relay_sla_deadlines left rows
    there: the watcher takes them over, and raises and deletes them."""
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO relay_sla_deadlines (order_id, restaurant_id, order_number, kind, due_at)"
            " VALUES (%s, %s, 'A-7', 'NotReady', now() - interval '1 minute')",
            (order, restaurant),
        )
    assert await _step(database_url) == 1
    assert _alerts(database_url) == [(order, "NotReady")]
    assert _parked(database_url) == {}


async def test_a_step_that_fails_leaves_memory_to_be_rebuilt(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    _enqueue(database_url, [event("OrderAccepted", restaurant_id=restaurant, order_id=order,
                                  at=AT)])  # fmt: skip
    _record(database_url)
    watcher = SlaWatcher(database_url, CONFIG)
    await _step(database_url, watcher)
    assert _open(watcher) == {order}
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.close()  # the session is lost under the watcher
    try:
        await watcher.step(conn)
    except psycopg.OperationalError:
        pass
    else:
        raise AssertionError("a step on a lost session must fail")
    assert watcher.deadlines() == {}  # what it held may be ahead of what committed
    await _step(database_url, watcher)
    assert _open(watcher) == {order} and watcher.rebuilds == 2


async def test_a_backlog_is_applied_in_bounded_steps(database_url: str) -> None:
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(5)]
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=o,
                                  at=AT) for o in orders])  # fmt: skip
    _record(database_url)
    watcher = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1, step_pages=2))
    await _step(database_url, watcher)
    assert watcher.behind and len(watcher.deadlines()) == 2
    steps = 1
    while watcher.behind:
        await _step(database_url, watcher)
        steps += 1
    assert _open(watcher) == set(orders) and steps == 3


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
    by_hand = {uuid.UUID(o): (d.kind, d.due) for o, d in handed.deadlines().items()}
    assert {o: kind for o, (kind, _due) in by_hand.items()} == {
        orders[0]: "NotAccepted",
        orders[1]: "NotReady",
        orders[2]: "DeliveryLate",
    }
    assert await _deadlines(url) == by_hand


async def test_a_handed_page_that_began_before_the_offset_continues_it(database_url: str) -> None:
    """The watcher read the first event of a window from the log; the
    recorder's page of the whole window then supplies the rest, each event once."""
    restaurant = uuid.uuid4()
    orders = [uuid.uuid4() for _ in range(3)]
    _enqueue(database_url, [event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=o,
                                  at=AT) for o in orders])  # fmt: skip
    window = _record(database_url)
    watcher = SlaWatcher(database_url, dataclasses.replace(CONFIG, page_size=1, step_pages=1))
    await _step(database_url, watcher)
    assert watcher.events == 1 and watcher.behind
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        page = await event_log.read(conn, Position.end_of(0), window, limit=1000)
    finally:
        await conn.close()
    watcher.handed(page)
    await _step(database_url, watcher)
    assert watcher.events == 3 and not watcher._handed
    assert _open(watcher) == set(orders)
