"""What publishing costs the order database in WAL, against the producer's own insert.

WAL is what the order service's database pays for durably (fsync, archiving,
replicas), so it is the plainest measure of "writes per event". The
producer's figure is single-row transactions as an order service commits
them; the relay's is every byte the database wrote while the relay took a
backlog of the same events (its windows, its followers' offsets, the SLA
watcher's deadlines, heartbeats), divided by the events. The server-wide
LSN counts every database on the server: the figures are the bench's own
only on a cluster with nothing else on it (``relay bench`` without
``DATABASE_URL`` starts one).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from relay.outbox import OutboxEvent, enqueue
from relay.recorder import CHECK
from relay.sql import query
from relay.tools.bench.env import Bench, RelayServer

__all__ = ["FOLLOWERS", "checkpoint", "lsn", "wait_caught_up", "wal"]

# The relay's own followers of the windows: done with a backlog when both are
# at the end of the newest window (the dead-letter check, the SLA watcher).
FOLLOWERS = (CHECK, "relay.sla")


def lsn(conn: psycopg.Connection[Any]) -> int:
    """The WAL insert position, as a byte offset (pg_lsn's text is hi/lo in hex)."""
    row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    assert row is not None
    high, low = str(row[0]).split("/")
    return (int(high, 16) << 32) + int(low, 16)


def checkpoint(conn: psycopg.Connection[Any]) -> None:
    """Flush the set-up's writes now, so that no checkpoint they provoke lands in
    a measured phase, and each phase pays the full-page images of the pages it
    touches first."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")  # a role without pg_checkpoint: measured as it comes


def wait_caught_up(
    conn: psycopg.Connection[Any], timeout: float = 600, followers: tuple[str, ...] = FOLLOWERS
) -> None:
    """Until every committed outbox row is in a recorded window and every one of
    ``followers`` is past the newest window (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(query("bench_relay_behind"), {"followers": list(followers)}).fetchone()
        if row is not None and not row[0]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the relay did not take the backlog in {timeout:g} s "
                f"(windows and followers {', '.join(followers)})"
            )
        time.sleep(0.05)


def _order_event(restaurant: uuid.UUID, n: int) -> OutboxEvent:
    """An order accepted now: its SLA deadline lies ahead, so no delay alert
    (a derived event, written by the relay) falls due during the measurement."""
    order = uuid.uuid4()
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return OutboxEvent.of(
        "OrderAccepted",
        {
            "orderId": str(order),
            "restaurantId": str(restaurant),
            "orderNumber": f"W-{n}",
            "newStatus": "Accepted",
            "lastUpdateTimestamp": now,
            "occurredOnUtc": now,
            "customerName": "Ada Lovelace",
        },
        customer_id=uuid.uuid4(),
    )


def _measure(bench: Bench, ids: list[uuid.UUID], events: int, *, sla: bool) -> tuple[int, int]:
    """WAL bytes of the producer's commits, then of a relay taking them."""
    with bench.database() as url, psycopg.connect(url, autocommit=True) as watch:
        # One checkpoint before both phases, none between: a page's first
        # change after a checkpoint logs a full image of it, which a long run
        # spreads over many events; here each phase pays for its own pages.
        checkpoint(watch)
        with psycopg.connect(url) as producer:
            before = lsn(watch)
            for n in range(events):
                enqueue(producer, _order_event(ids[n % len(ids)], n))
                producer.commit()  # one order change, one transaction
            produced = lsn(watch) - before
        before = lsn(watch)
        env = {} if sla else {"RELAY_SLA_ENABLED": "false"}
        with RelayServer(bench, url, **env) as server:
            server.wait_ready()
            wait_caught_up(watch, followers=FOLLOWERS if sla else (CHECK,))
            drained = lsn(watch) - before
    return produced, drained


def wal(bench: Bench, events: int, restaurants: int = 100) -> dict[str, Any]:
    """``producer_wal_bytes_per_event`` (single-row commits) and the relay's
    ``wal_bytes_per_event`` taking them: the relay starts on the backlog and
    the position is read again once it has recorded and checked every row and
    the SLA watcher is past them. ``sla_off_wal_bytes_per_event``: the same
    with the SLA watcher off (windows, the check's offset, heartbeats), which
    is what the snapshot windows themselves cost."""
    ids = [uuid.uuid4() for _ in range(restaurants)]
    produced, drained = _measure(bench, ids, events, sla=True)
    _, bare = _measure(bench, ids, events, sla=False)
    producer_per_event = produced / events
    relay_per_event = drained / events
    return {
        "events": events,
        "producer_wal_bytes_per_event": round(producer_per_event),
        "wal_bytes_per_event": round(relay_per_event, 1),
        "relay_to_producer": round(relay_per_event / producer_per_event, 4),
        "sla_off_wal_bytes_per_event": round(bare / events, 1),
        "sla_off_to_producer": round(bare / events / producer_per_event, 4),
    }
