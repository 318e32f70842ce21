"""SLA / delay alerts: derived events, raised from PostgreSQL state, exactly once.

One replica at a time (a transaction-level advisory lock) follows the event
log from ``relay_sla_offsets`` and keeps each open order's next deadline in
``relay_sla_deadlines``: paid → must be accepted within ``not_accepted``;
accepted → must be ready within ``not_ready``; ready → must be delivered by
its ``estimatedDeliveryTime`` plus ``delivery_grace``. The awaited event
replaces or clears the deadline, which cancels the alert. A due deadline
becomes an ``OrderDelayAlert`` outbox row in the same transaction that deletes
it, so the alert flows through the normal pipeline (restaurant stream, the
customer's order stream, resume, ordering) and a crash never doubles it.
Timers live in the database, so they survive restarts and replica changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from relay.db import aconnect_retrying
from relay.dispatcher.listener import _KEEPALIVE
from relay.errors import DatabaseUnavailable
from relay.events.types import _utc
from relay.sql import query

__all__ = ["SlaConfig", "SlaWatcher"]

log = logging.getLogger("relay.sla")

_LOCK_KEY = 0x72656C6179 + 2
_CLOSED = {"OrderDelivered", "OrderRejected", "OrderCancelled", "OrderPaymentFailed"}


@dataclass(frozen=True)
class SlaConfig:
    not_accepted: timedelta = timedelta(minutes=3)
    not_ready: timedelta = timedelta(minutes=25)
    delivery_grace: timedelta = timedelta(0)
    scan_every: float = 1.0
    per_partition: int = 500


class SlaWatcher:
    def __init__(self, database_url: str, config: SlaConfig | None = None) -> None:
        self._url = database_url
        self.config = config or SlaConfig()
        self.raised = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            conn = await aconnect_retrying(
                self._url, stop, label="sla", logger=log, autocommit=True, **_KEEPALIVE
            )
            if conn is None:
                return
            try:
                while not stop.is_set():
                    await asyncio.wait_for(self.step(conn), 60)  # half-open: reconnect
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.config.scan_every)
            except (psycopg.OperationalError, DatabaseUnavailable, OSError) as exc:
                log.warning("sla watcher lost its connection (%s)", str(exc).splitlines()[:1])
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Apply new log events, then raise what is due; returns alerts raised."""
        while True:
            async with conn.transaction():
                if not await self._locked(conn):
                    return 0
                applied = await self._apply_log(conn)
            if applied < self.config.per_partition:
                break
        async with conn.transaction():
            if not await self._locked(conn):
                return 0
            cur = await conn.execute(query("sla_raise_due"), {"limit": 100})
            raised = await cur.fetchall()
        for order_id, kind in raised:
            log.info("delay alert %s for order %s", kind, order_id)
        self.raised += len(raised)
        return len(raised)

    async def _locked(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(query("sla_lock"), {"key": _LOCK_KEY})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _apply_log(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            query("sla_read_log"), {"per_partition": self.config.per_partition}
        )
        rows = await cur.fetchall()
        heads: dict[int, int] = {}
        counts: dict[int, int] = {}
        deadlines: dict[Any, tuple[Any, ...] | None] = {}  # order -> row, or None to clear
        for partition, position, event_type, restaurant, order, customer, data in rows:
            heads[partition] = position
            counts[partition] = counts.get(partition, 0) + 1
            if order is None:
                continue
            change = self._deadline(event_type, json.loads(data))
            if change is _KEEP:
                continue
            if change is None:
                deadlines[order] = None
            else:
                kind, since, default, number = change
                deadlines[order] = (order, restaurant, customer, number, kind, since, default)
        cleared = [order for order, row in deadlines.items() if row is None]
        if cleared:
            await conn.execute(query("sla_clear_deadlines"), {"order_ids": cleared})
        kept = [row for row in deadlines.values() if row is not None]
        if kept:
            columns = list(zip(*kept, strict=True))
            names = ("order_id", "restaurant_id", "customer_id", "order_number", "kind", "since",
                     "default_after")  # fmt: skip
            await conn.execute(
                query("sla_set_deadlines"),
                {name: list(values) for name, values in zip(names, columns, strict=True)},
            )
        if heads:
            await conn.execute(
                query("sla_advance"),
                {"partitions": list(heads), "positions": list(heads.values())},
            )
        return max(counts.values(), default=0)

    def _deadline(self, event_type: str, data: dict[str, Any]) -> Any:
        """(kind, since, default, order number), None to clear, or _KEEP."""
        if event_type in _CLOSED:
            return None
        cfg = self.config
        number = data.get("orderNumber")
        updated = _time(data.get("lastUpdateTimestamp")) or _time(data.get("occurredOnUtc"))
        if event_type == "OrderPaymentSucceeded" and updated is not None:
            return ("NotAccepted", updated, cfg.not_accepted, number)
        if event_type == "OrderAccepted" and updated is not None:
            return ("NotReady", updated, cfg.not_ready, number)
        if event_type == "OrderReadyForDelivery":
            estimate = _time(data.get("estimatedDeliveryTime"))
            if estimate is None:
                return None
            return ("DeliveryLate", estimate, cfg.delivery_grace, number)
        return _KEEP  # Preparing, alerts, other types: the current deadline stands


_KEEP = object()


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        return _utc(value)
    except ValueError:
        return None
