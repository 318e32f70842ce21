"""What publishing costs the order database in WAL, against the producer's own insert.

WAL is what the order service's database pays for durably (fsync, archiving,
replicas), so it is the plainest measure of "writes per event". The producer's
figure is single-row transactions as an order service commits them; the
relay's is every byte the database wrote while the relay drained a backlog
of the same events (the claim, the log, the dead-letter and SLA bookkeeping,
heartbeats), divided by the events. One cluster per bench run and nothing else
on it, so the server-wide LSN is the bench's own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import psycopg

from relay.outbox import OutboxEvent, enqueue
from relay.tools.bench.env import Bench, RelayServer

__all__ = ["wal"]

_LSN = "SELECT pg_current_wal_insert_lsn()"
_BEHIND = """
SELECT (SELECT count(*) FROM relay_outbox)
     + (SELECT coalesce(sum(p.last_position - s.position), 0)
        FROM relay_partitions AS p JOIN relay_sla_offsets AS s USING (partition))
"""


def _lsn(conn: psycopg.Connection[Any]) -> int:
    """The WAL insert position, as a byte offset (pg_lsn's text is hi/lo in hex)."""
    row = conn.execute(_LSN).fetchone()
    assert row is not None
    high, low = str(row[0]).split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _checkpoint(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")  # a role without pg_checkpoint: measured as it comes


def _order_event(restaurant: uuid.UUID, n: int) -> OutboxEvent:
    order = uuid.uuid4()
    return OutboxEvent.of(
        "OrderAccepted",
        {
            "orderId": str(order),
            "restaurantId": str(restaurant),
            "orderNumber": f"W-{n}",
            "newStatus": "Accepted",
            "lastUpdateTimestamp": "2026-11-29T12:00:00Z",
            "occurredOnUtc": "2026-11-29T12:00:00Z",
            "customerName": "Ada Lovelace",
        },
        customer_id=uuid.uuid4(),
    )


def wal(bench: Bench, events: int, restaurants: int = 100) -> dict[str, Any]:
    """``producer_wal_bytes_per_event`` and the relay's ``wal_bytes_per_event``."""
    ids = [uuid.uuid4() for _ in range(restaurants)]
    with bench.database() as url, psycopg.connect(url, autocommit=True) as watch:
        # One checkpoint before both phases, none between: a page's first
        # change after a checkpoint logs a full image of it, which a long run
        # spreads over many events; here each phase pays for its own pages.
        _checkpoint(watch)
        with psycopg.connect(url) as producer:
            before = _lsn(watch)
            for n in range(events):
                enqueue(producer, _order_event(ids[n % restaurants], n))
                producer.commit()  # one order change, one transaction
            produced = _lsn(watch) - before
        before = _lsn(watch)
        with RelayServer(bench, url) as server:
            server.wait_ready()
            deadline = time.monotonic() + 600
            while True:
                row = watch.execute(_BEHIND).fetchone()
                if row is not None and int(row[0]) == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay did not drain the backlog in 600 s")
                time.sleep(0.05)
            drained = _lsn(watch) - before
    producer_per_event = produced / events
    relay_per_event = drained / events
    return {
        "events": events,
        "producer_wal_bytes_per_event": round(producer_per_event),
        "wal_bytes_per_event": round(relay_per_event),
        "relay_to_producer": round(relay_per_event / producer_per_event, 3),
    }
