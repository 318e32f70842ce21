"""LISTEN on a dedicated connection that is checked and replaced when it dies.

psycopg's ``notifies()`` holds its connection while it yields, so the listener
owns a connection of its own (never a pooled one) and only wakes its callers;
notifications carry hints, never data. Between waits it pings the server, so a
silently dead connection (half-open TCP) is noticed within ``ping_every`` and
replaced, while callers keep working through their polling fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from relay.db import aconnect_retrying
from relay.errors import DatabaseUnavailable

__all__ = ["Listener"]

log = logging.getLogger("relay.listener")


class Listener:
    """Calls ``on_notify(channel, payload, sender_pid)`` per notification; reconnects forever."""

    def __init__(
        self,
        database_url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str, int], None],
        *,
        ping_every: float = 5.0,
        ping_timeout: float = 3.0,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._url = database_url
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._ping_every = ping_every
        self._ping_timeout = ping_timeout
        self._on_reconnect = on_reconnect
        self.connected = False
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            conn = await aconnect_retrying(
                self._url, stop, label="listener", logger=log, autocommit=True, **_KEEPALIVE
            )
            if conn is None:
                break
            self._conn = conn
            try:
                await self._listen(conn, stop)
            except (psycopg.Error, DatabaseUnavailable, OSError, TimeoutError) as exc:
                log.warning("listener lost (%s); polling covers until it is back", _short(exc))
            finally:
                self.connected = False
                await self._close()
        self.connected = False

    async def _listen(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        for channel in self._channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.connected = True
        log.info("listening on %s", ", ".join(self._channels))
        if self._on_reconnect is not None:
            self._on_reconnect()  # notifications may have been missed meanwhile
        while not stop.is_set():
            async for notice in conn.notifies(timeout=self._ping_every):
                try:
                    self._on_notify(notice.channel, notice.payload, notice.pid)
                except Exception:  # a bad notification must not kill the listener
                    log.exception("error handling a notification on %s", notice.channel)
                if stop.is_set():
                    return
            # No traffic for a while: prove the connection is alive (half-open TCP).
            await asyncio.wait_for(conn.execute("SELECT 1"), self._ping_timeout)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def kill(self) -> None:
        """Drop the connection now (tests and shutdown)."""
        await self._close()


_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
