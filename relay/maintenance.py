"""Housekeeping every relay process shares: heartbeat, retention, table hygiene.

Retention and VACUUM run in one replica at a time (an advisory lock), in
small steps, so they never hold a lock that claiming or producers wait on.
The relay vacuums its own tables because it cannot count on autovacuum
(MEASURED.md: dead index entries slow the claim 2.7x when nobody vacuums).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg

from relay import log as event_log
from relay.db import sleep_or_stop
from relay.metrics import M
from relay.sessions import LOST, hold_session
from relay.sql import query

__all__ = ["Maintenance"]

log = logging.getLogger("relay.maintenance")

_LOCK_KEY = 0x72656C6179 + 1
_IO_TIMEOUT = 15.0


class Maintenance:
    def __init__(
        self,
        database_url: str,
        *,
        replica_id: str,
        roles: list[str],
        retention: timedelta,
        published: Callable[[], int],
        heartbeat_every: float = 5.0,
        prune_every: float = 30.0,
        vacuum_every: float = 30.0,
    ) -> None:
        self._url = database_url
        self.replica_id = replica_id
        self._roles = roles
        self._retention = retention
        self._published = published
        self._heartbeat_every = heartbeat_every
        self._prune_every = prune_every
        self._vacuum_every = vacuum_every

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + 1.0
        next_vacuum = loop.time() + self._vacuum_every

        async def upkeep(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal next_prune, next_vacuum
            while not stop.is_set():
                # Bounded, so a half-open connection is noticed and replaced.
                await asyncio.wait_for(self._heartbeat(conn), _IO_TIMEOUT)
                now = loop.time()
                if now >= next_prune:
                    await asyncio.wait_for(self._exclusive(conn, self._prune), 600)
                    next_prune = now + self._prune_every
                if now >= next_vacuum:
                    await asyncio.wait_for(self._exclusive(conn, self._vacuum), 600)
                    next_vacuum = now + self._vacuum_every
                await sleep_or_stop(stop, self._heartbeat_every)
            await conn.execute(query("leave"), {"replica_id": self.replica_id})

        await hold_session(
            self._url, stop, upkeep, label="maintenance", logger=log,
            lost=(psycopg.Error, *LOST), pause=2.0,
        )  # fmt: skip

    async def _heartbeat(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM relay_outbox), (SELECT count(*) FROM relay_replicas"
            " WHERE heartbeat_at > now() - interval '30 seconds')"
        )
        row = await cur.fetchone()
        if row:
            M.backlog.set(row[0])
            M.replicas.set(row[1])
        await conn.execute(
            query("heartbeat"),
            {
                "replica_id": self.replica_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "roles": self._roles,
                "published": self._published(),
            },
        )

    async def _exclusive(
        self, conn: psycopg.AsyncConnection[Any], job: Callable[[psycopg.AsyncConnection[Any]], Any]
    ) -> None:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,))
        row = await cur.fetchone()
        if not (row and row[0]):
            return
        try:
            await job(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))

    async def _prune(self, conn: psycopg.AsyncConnection[Any]) -> None:
        deleted = await event_log.prune(conn, self._retention)
        if deleted:
            log.info("retention removed %d event(s) older than %s", deleted, self._retention)
            await conn.execute("VACUUM (ANALYZE) relay_events")

    async def _vacuum(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # relay_outbox only holds pending rows, so this is cheap; it clears the
        # dead index entries every claim would otherwise walk past again.
        await conn.execute("VACUUM relay_outbox")
        await conn.execute("VACUUM relay_partitions")
        await conn.execute(query("forget_dead_replicas"))
