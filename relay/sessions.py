"""Long-lived database sessions: one reconnect loop for all of them, and LISTEN.

Every component that keeps a connection for its lifetime (the dispatcher, the
hub, the listeners, the SLA follower, the publishers, maintenance) runs its
work through ``hold_session``: connect with back-off, run, and when the
connection is lost log one line, reconnect and run again, until stopped.

psycopg's ``notifies()`` holds its connection while it yields, so a listener
owns a connection of its own (never a pooled one) and only wakes its callers;
notifications carry hints, never data. Between waits it pings the server, so a
silently dead connection (half-open TCP) is noticed within ``ping_every`` and
replaced, while callers keep working through their polling fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from relay.db import aconnect_retrying, sleep_or_stop
from relay.errors import DatabaseUnavailable

__all__ = ["KEEPALIVE", "LOST", "Listener", "hold_session"]

log = logging.getLogger("relay.listener")

# TCP keepalives on every long-lived session: a peer that vanished is noticed
# by the kernel within about 11 s even when the session is idle.
KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}

# What ends a session but not its owner: the connection or the server went
# away, or a bounded wait ran out (a half-open connection).
LOST: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    DatabaseUnavailable,
    OSError,
    TimeoutError,
)

Session = psycopg.AsyncConnection[Any]


async def hold_session(
    database_url: str,
    stop: asyncio.Event,
    work: Callable[[Session], Awaitable[None]],
    *,
    label: str,
    logger: logging.Logger,
    lost: tuple[type[BaseException], ...] = LOST,
    on_lost: Callable[[BaseException], None] | None = None,
    pause: float = 0.5,
    **connect: Any,
) -> None:
    """Run ``work`` on a connection of its own until ``stop`` is set.

    When the connection is lost (``lost``), says so in one line, closes it,
    waits ``pause``, reconnects with back-off (``aconnect_retrying``) and runs
    ``work`` again on the new connection. ``work`` returning also reconnects
    unless stopped. Anything else is a bug and propagates.
    """
    options = {"autocommit": True, **KEEPALIVE, **connect}
    while not stop.is_set():
        conn = await aconnect_retrying(database_url, stop, label=label, logger=logger, **options)
        if conn is None:
            return
        try:
            await work(conn)
            continue
        except lost as exc:
            logger.warning("%s: database connection lost (%s); reconnecting", label, _short(exc))
            if on_lost is not None:
                on_lost(exc)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
        await sleep_or_stop(stop, pause)


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
        try:
            await hold_session(
                self._url, stop, partial(self._listen, stop=stop), label="listener", logger=log,
                lost=(psycopg.Error, *LOST),
            )  # fmt: skip
        finally:
            self.connected = False

    async def _listen(self, conn: Session, stop: asyncio.Event) -> None:
        self._conn = conn
        try:
            await self._listen_on(conn, stop)
        finally:
            self.connected = False
            self._conn = None

    async def _listen_on(self, conn: Session, stop: asyncio.Event) -> None:
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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
