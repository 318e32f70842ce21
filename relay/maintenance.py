"""Housekeeping every relay process shares: heartbeat, retention, table hygiene.

Retention and VACUUM run in one replica at a time (an advisory lock), in
small steps, so they never hold a lock that the recorder or producers wait on.

Retention is by time, as before the snapshot windows: rows of windows
recorded more than ``RELAY_RETENTION`` ago are deleted whatever the followers'
offsets (relay_offsets). A publisher or the SLA watcher stopped for longer
than that resumes at the oldest retained window (a stream's cursor that old
gets ``event: reset``); holding rows for a follower that may never come back would
let one forgotten publisher name grow the outbox without bound. Rows no
window holds yet are never deleted: retention counts from the window.
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

__all__ = ["Maintenance", "prune"]

log = logging.getLogger("relay.maintenance")

_LOCK_KEY = 0x72656C6179 + 1
_IO_TIMEOUT = 15.0
# The backlog gauge counts unrecorded rows up to this many: past it, the
# figure says "large" and a count of every row each heartbeat would cost
# the order database a scan of the backlog.
_BACKLOG_CAP = 10_000
_CUT_SCAN = 100_000  # windows looked at per retention run


async def prune(
    conn: psycopg.AsyncConnection[Any], retention: timedelta, *, batch: int = 1000
) -> int:
    """Cut the log at the newest window recorded ``retention`` ago; returns rows deleted.

    ``conn`` must be in autocommit: each step is its own short transaction.
    The cut is announced first (``relay_log_bounds``), so a reader resets a
    cursor below it rather than read a window while its rows go; then the
    rows go in batches of ``batch``, then the windows before the cut. A run
    interrupted half-way is finished by the next one (same cut or later).
    """
    cur = await conn.execute(query("retention_cut"), {"retention": retention, "scan": _CUT_SCAN})
    row = await cur.fetchone()
    if row is None or row[0] is None:
        # Nothing new to cut; an interrupted run's rows still go below.
        cut = (await event_log.head(conn)).pruned_through
    else:
        cut = int(row[0])
        await conn.execute(query("retention_mark"), {"cut": cut})
    if cut < 0:
        return 0
    deleted, after = 0, (0, -1)
    while True:
        cur = await conn.execute(
            query("retention_delete_rows"),
            {"cut": cut, "after_xid": str(after[0]), "after_id": after[1], "limit": batch},
        )
        found = await cur.fetchone()
        assert found is not None
        seen, gone, last_xid, last_id = found
        deleted += int(gone)
        if last_xid is None or int(seen) < batch:
            break
        after = (int(last_xid), int(last_id))
    await conn.execute(query("retention_delete_windows"), {"cut": cut})
    return deleted


class Maintenance:
    def __init__(
        self,
        database_url: str,
        *,
        replica_id: str,
        roles: Callable[[], list[str]],
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
        cur = await conn.execute(query("newest_snapshot"))
        newest = await cur.fetchone()
        if newest:
            cur = await conn.execute(
                query("backlog_unrecorded"),
                event_log.unrecorded_bounds(newest[0], _BACKLOG_CAP),
                prepare=False,
            )
            row = await cur.fetchone()
            if row:
                M.backlog.set(row[0])
        cur = await conn.execute(query("live_replicas"))
        row = await cur.fetchone()
        if row:
            M.replicas.set(row[0])
        await conn.execute(
            query("heartbeat"),
            {
                "replica_id": self.replica_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "roles": self._roles(),
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
        deleted = await prune(conn, self._retention)
        if deleted:
            log.info("retention removed %d event(s) older than %s", deleted, self._retention)
            # The deleted rows' space and index entries, and the windows'.
            await conn.execute("VACUUM (ANALYZE) relay_outbox")
            await conn.execute("VACUUM relay_windows")

    async def _vacuum(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # The relay's own hot rows: the followers' offsets (updated several
        # times a second) and the SLA deadlines (one churn per order).
        await conn.execute("VACUUM relay_offsets")
        await conn.execute("VACUUM relay_sla_deadlines")
        await conn.execute(query("forget_dead_replicas"))
