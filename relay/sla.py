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
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from relay.db import sleep_or_stop
from relay.sessions import hold_session
from relay.sql import query

__all__ = ["SlaConfig", "SlaWatcher"]

log = logging.getLogger("relay.sla")

_LOCK_KEY = 0x72656C6179 + 2


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
        async def follow(conn: psycopg.AsyncConnection[Any]) -> None:
            while not stop.is_set():
                await asyncio.wait_for(self.step(conn), 60)  # half-open: reconnect
                await sleep_or_stop(stop, self.config.scan_every)

        await hold_session(self._url, stop, follow, label="sla", logger=log)

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
        """One step of following the log, entirely in SQL (no per-event Python)."""
        cfg = self.config
        cur = await conn.execute(
            query("sla_apply_log"),
            {
                "per_partition": cfg.per_partition,
                "not_accepted": cfg.not_accepted,
                "not_ready": cfg.not_ready,
                "delivery_grace": cfg.delivery_grace,
            },
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0
