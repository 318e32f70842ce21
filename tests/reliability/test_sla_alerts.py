"""SLA / delay alerts: derived from database state, exactly once across replicas and crashes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import psycopg

from relay import log as event_log
from relay.log import ORIGIN, LogEvent
from relay.outbox import enqueue
from tests.helpers.orders import event
from tests.helpers.relay_process import RelayProcess

FAST_SLA = {"RELAY_SLA_NOT_ACCEPTED": "2s", "RELAY_SLA_NOT_READY": "30m"}


async def _read_alerts(url: str) -> list[LogEvent]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        head = await event_log.head(conn)
        at, found = max(ORIGIN, head.oldest), list[LogEvent]()
        while at < head.end:
            page = await event_log.read(conn, at, head.window)
            found += [e for e in page.events if e.event_type == "OrderDelayAlert"]
            at = page.reached
        return found
    finally:
        await conn.close()


def _uuid(text: str | None) -> uuid.UUID | None:
    return None if text is None else uuid.UUID(text)


def _alerts(url: str) -> list[tuple[uuid.UUID | None, str, list[str], uuid.UUID | None]]:
    """The delay alerts in the log (recorded in a window, valid), in log order."""
    return [
        (_uuid(e.order_id), json.loads(e.data)["kind"], list(e.channels), _uuid(e.customer_id))
        for e in asyncio.run(_read_alerts(url))
    ]


def test_unaccepted_order_alerts_once_with_two_replicas_and_a_kill(database_url: str) -> None:
    replicas = [
        RelayProcess(database_url, ("--dispatcher-only",), dict(FAST_SLA)).start(wait=False)
        for _ in range(2)
    ]
    try:
        restaurant, late, on_time = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        customer = uuid.uuid4()
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=late,
                                customer_id=customer))  # fmt: skip
            enqueue(
                conn, event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=on_time)
            )
        time.sleep(0.8)
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=on_time))
        replicas[0].kill()  # a replica dies while the timer is running
        replicas[0].start(wait=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _alerts(database_url):
            time.sleep(0.2)
        time.sleep(3.0)  # time for a second (wrong) alert to appear, if it would
        alerts = _alerts(database_url)
        assert [(order, kind) for order, kind, _, _ in alerts] == [(late, "NotAccepted")]
        channels = alerts[0][2]
        assert f"restaurant:{restaurant}" in channels and f"order:{restaurant}:{late}" in channels
        with psycopg.connect(database_url) as conn:
            left = conn.execute("SELECT count(*) FROM relay_sla_deadlines WHERE order_id = %s",
                                (late,)).fetchone()  # fmt: skip
        assert alerts[0][3] == customer  # the customer's order stream may carry the delay notice
        assert left == (0,)
    finally:
        for r in replicas:
            r.__exit__()


def test_the_awaited_event_cancels_the_alert(database_url: str) -> None:
    proc = RelayProcess(database_url, ("--dispatcher-only",), dict(FAST_SLA)).start(wait=False)
    try:
        restaurant, order = uuid.uuid4(), uuid.uuid4()
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=order))
        time.sleep(0.5)
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderCancelled", restaurant_id=restaurant, order_id=order))
        time.sleep(4.0)
        assert _alerts(database_url) == []
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM relay_sla_deadlines").fetchone() == (0,)
    finally:
        proc.__exit__()
