"""The SLA watcher's deadline rules, step by step against a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from relay.dispatcher import claim_and_publish
from relay.outbox import enqueue
from relay.sla import SlaConfig, SlaWatcher
from tests.helpers.orders import event

# In the future: a deadline already due would be raised (and deleted) by the same step.
AT = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
CONFIG = SlaConfig(
    not_accepted=timedelta(minutes=3),
    not_ready=timedelta(minutes=25),
    delivery_grace=timedelta(minutes=5),
    per_partition=2,  # small steps: the watcher must loop until the log is applied
)


async def _publish_and_step(url: str, events: list[Any]) -> dict[uuid.UUID, tuple[str, datetime]]:
    with psycopg.connect(url) as producer:
        for e in events:
            enqueue(producer, e)
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        while (await claim_and_publish(conn, batch_size=500)).claimed:
            pass
        await SlaWatcher(url, CONFIG).step(conn)
        cur = await conn.execute("SELECT order_id, kind, due_at FROM relay_sla_deadlines")
        return {order: (kind, due) for order, kind, due in await cur.fetchall()}
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
    with psycopg.connect(database_url) as conn:
        behind = conn.execute(
            "SELECT count(*) FROM relay_sla_offsets AS o JOIN relay_partitions AS p"
            " USING (partition) WHERE o.position <> p.last_position"
        ).fetchone()
    assert behind == (0,)  # every published event was applied


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
