"""The recorder: cuts the outbox into snapshot windows and checks each one.

One replica at a time holds the recorder's lease (a session advisory lock:
it dies with the connection, so a killed recorder's role is taken by the
next replica's tick, and nobody ever waits for it). The holder:

1. records a window when one would hold anything: one small row (this
   moment's snapshot) and a ``NOTIFY relay_windows`` to every process;
2. reads each new window once, validates and renders its rows (the same
   code every reader runs), files the rows every reader rejects as dead
   letters, and hands the page to this process's gateway, which so needs no
   read of its own; a durable offset (``relay.check``) says how far it got.

Nothing is written per event. Wake-up (MEASURED.md: a NOTIFY in each
producer commit costs producers ~40%):

* ``poll`` (default): probe for a due window (two index probes, no write)
  every 0.5 ms for 100 ms after a window with events, then with a back-off
  to ``poll_idle`` (5 x after a second without events); after a window,
  linger a little that grows with the window (fewer, larger windows under
  heavy load).
* ``notify``: a statement trigger NOTIFYs ``relay_outbox``; a dedicated
  listener wakes the loop. Probing continues at ``poll_idle`` while the
  listener is down.

Either way the probe runs at least every ``safety_sweep``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg

from relay import log as event_log
from relay.errors import clip
from relay.log import CHECK, Page, Position
from relay.metrics import M
from relay.sessions import Listener, hold_session
from relay.sql import query

__all__ = ["CHECK", "Recorder", "RecorderConfig"]

log = logging.getLogger("relay.recorder")


_FIRST_BACKOFF = 0.0005
# For this long after a window with events the probe does not back off: live
# producers commit every few milliseconds, and a back-off doubling to
# ``poll_idle`` between them was most of an event's latency.
_CHASE_SECONDS = 0.1
_DEEP_IDLE_AFTER = 1.0
_DEEP_IDLE = 5
_LINGER_PER_EVENT = 0.00025
# Windows smaller than this are followed by the next at once (after the
# window interval): a window costs a statement and a commit on the
# producers' database whatever it holds, but at a few events per window a
# linger would be pure latency. From 8 rows (above ~2,500 events/s) windows
# grow instead: the recorder's share of PostgreSQL's core beside busy
# producers halved, with live latency at 1,000 events/s unchanged.
_LINGER_FROM = 8
# The check's offset is written at most this often (and whenever it files a
# dead letter): re-checking a few windows after a crash files nothing twice.
_OFFSET_EVERY = 0.2


@dataclass(frozen=True)
class RecorderConfig:
    batch_size: int = 5000  # rows per page of the check
    wakeup: str = "poll"
    poll_idle: float = 0.010
    linger: float = 0.025
    window_interval: float = 0.002  # shortest time between two windows
    safety_sweep: float = 1.0
    # Client-side bound on any one round trip: a half-open connection (a
    # network that silently drops packets) must not stall the loop forever.
    query_timeout: float = 30.0
    session_settings: dict[str, str] = field(
        default_factory=lambda: {
            "idle_in_transaction_session_timeout": "15s",
            "statement_timeout": "30s",
            "lock_timeout": "5s",
        }
    )

    def pause_after(self, rows: int, since_window: float) -> float:
        """Seconds to wait before the next window, after one of ``rows`` rows
        whose statement started ``since_window`` seconds ago. Live producers:
        a linger that grows with the last window (a window costs a statement
        and a commit however few rows it holds): at a few events latency
        wins, at thousands the database's CPU does. Never two windows closer
        than the interval: back-to-back windows of a few rows took the
        producers' CPU."""
        linger = 0.0 if rows < _LINGER_FROM else min(self.linger, _LINGER_PER_EVENT * rows)
        return max(linger, self.window_interval - since_window)


class Recorder:
    """Runs until ``stop`` is set; ``on_page`` sees each page the check read."""

    def __init__(
        self,
        database_url: str,
        config: RecorderConfig | None = None,
        *,
        on_page: Callable[[Page], None] | None = None,
    ) -> None:
        self._url = database_url
        self.config = config or RecorderConfig()
        self._on_page = on_page
        self._wake = asyncio.Event()
        self.running = False
        self.leading = False
        self.backend_pid: int | None = None  # of the recording connection (hub skips its NOTIFYs)
        self.published = 0  # events checked by this process
        self.dead_lettered = 0
        self.windows = 0
        self._checked: Position | None = None
        self.decided = False  # the lease was tried once (leading or standing by)
        self._listener: Listener | None = None

    def checked(self) -> Position | None:
        """How far this process's check has handed the log over, while it leads."""
        return self._checked if self.leading else None

    @property
    def listener_connected(self) -> bool | None:
        """None in poll mode (no listener needed)."""
        return None if self._listener is None else self._listener.connected

    async def run(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task[None]] = []
        if self.config.wakeup == "notify":
            self._listener = Listener(
                self._url,
                ["relay_outbox"],
                lambda _c, _p, _pid: self._wake.set(),
                on_reconnect=self._wake.set,
            )
            tasks.append(asyncio.create_task(self._listener.run(stop), name="outbox-listener"))
        try:
            await hold_session(
                self._url, stop, partial(self._serve, stop=stop), label="recorder", logger=log
            )
        finally:
            self.running = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        try:
            for name, value in self.config.session_settings.items():
                await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            await self._converge_wakeup(conn)
            self.backend_pid = conn.info.backend_pid
            self.running = True
            await self._loop(conn, stop)
        finally:
            self.running = False
            self.leading = False
            self.backend_pid = None

    async def _converge_wakeup(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Attach the NOTIFY trigger in notify mode, remove it in poll mode."""
        cur = await conn.execute(query("notify_trigger_exists"))
        row = await cur.fetchone()
        exists = bool(row and row[0])
        wanted = self.config.wakeup == "notify"
        if exists == wanted:
            return
        try:
            await conn.execute(query("install_notify_trigger" if wanted else "drop_notify_trigger"))
            log.info(
                "wake-up mode %s: NOTIFY trigger %s",
                self.config.wakeup,
                "installed" if wanted else "removed",
            )
        except psycopg.errors.LockNotAvailable:
            log.warning(
                "could not change the NOTIFY trigger now (table busy); will retry on reconnect"
            )

    async def _loop(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        check = _Check(conn, cfg.batch_size)
        last_event = loop.time()
        next_sweep = 0.0  # try the lease at once
        backoff = _FIRST_BACKOFF
        window_at = 0.0
        while not stop.is_set():
            now = loop.time()
            if not self.leading:
                if now >= next_sweep:
                    next_sweep = now + cfg.safety_sweep
                    async with asyncio.timeout(cfg.query_timeout):
                        self.leading = await _take_lease(conn)
                    if self.leading:
                        log.info("recording windows (this replica holds the recorder lease)")
                        await check.start()
                        self._checked = check.at
                    self.decided = True
                if not self.leading:
                    await self._pause(stop, cfg.safety_sweep)
                    continue
            async with asyncio.timeout(cfg.query_timeout):
                rows = await check.catch_up(self._handed)
                if check.behind:
                    await asyncio.sleep(0)  # a big window: its next page at once
                    continue
                # Caught up. While producers are active a probe usually finds
                # a window due: its first page comes in the same statement.
                # Idle, the bare probe (half the cost) runs instead.
                probed_at = loop.time()
                chasing = probed_at - last_event < _CHASE_SECONDS
                turn = await event_log.record_window_if_due(
                    conn, read_after=check.head if chasing else None, limit=cfg.batch_size
                )
                check.saw(turn.newest)
                if turn.recorded is not None:
                    # The interval runs from start to start: the round trips
                    # of a window are not added to the next one's wait.
                    window_at = probed_at
                    self.windows += 1
                    M.windows.inc()
                    if turn.page is not None:
                        rows += await check.accept(turn.page, self._handed)
                    # The rest of the new window at once: its frames are due now.
                    rows += await check.catch_up(self._handed)
            if rows:
                last_event = loop.time()
                backoff = _FIRST_BACKOFF
                since_window = loop.time() - window_at
                await asyncio.sleep(0 if check.behind else cfg.pause_after(rows, since_window))
                continue
            if check.behind:
                continue
            await self._pause(stop, backoff)
            quiet = loop.time() - last_event
            if quiet > _CHASE_SECONDS:
                deep = quiet > _DEEP_IDLE_AFTER
                backoff = min(backoff * 2, cfg.poll_idle * (_DEEP_IDLE if deep else 1))
            if self._wake.is_set():
                self._wake.clear()
                backoff = _FIRST_BACKOFF

    def _handed(self, page: Page) -> None:
        self._checked = page.reached
        self.published += len(page.events)
        self.dead_lettered += len(page.rejected)
        if self._on_page is not None:
            try:
                self._on_page(page)
            except Exception:
                log.exception("error handing a checked page to the gateway")

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        if self.config.wakeup != "notify":
            # A plain timer (the loop checks ``stop``): no tasks per pause, an
            # idle relay pauses a hundred times a second.
            await asyncio.sleep(seconds)
            return
        if self.listener_connected:
            seconds = max(seconds, self.config.safety_sweep)
        wake = asyncio.ensure_future(self._wake.wait())
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({wake, halt}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            halt.cancel()


async def _take_lease(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute(query("recorder_lock"))
    row = await cur.fetchone()
    return bool(row and row[0])


class _Check:
    """The recorder's read of every new window: dead letters filed once, pages
    handed to this process's gateway, progress kept in ``relay.check``."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], page: int) -> None:
        self._conn = conn
        self._page = page
        self.at = Position.end_of(-1)
        self._saved = self.at
        self._saved_at = 0.0
        self.head = 0

    async def start(self) -> None:
        """Resume where the last recorder's check stopped."""
        async with self._conn.transaction():
            at = await event_log.take_offset(self._conn, CHECK)
        log_head = await event_log.head(self._conn)
        self.head = log_head.window
        self.at = max(at or log_head.end, log_head.oldest)
        self._saved = self.at

    def saw(self, window: int) -> None:
        """``window`` exists: the check has to read up to it."""
        self.head = max(self.head, window)

    @property
    def behind(self) -> bool:
        return self.at < Position.end_of(self.head)

    async def catch_up(self, hand: Callable[[Page], None]) -> int:
        """Check the windows up to the newest seen, a page at most when one
        window is big; returns the rows read."""
        rows = 0
        while self.at < Position.end_of(self.head):
            page = await event_log.read(self._conn, self.at, self.head, limit=self._page)
            rows += await self.accept(page, hand)
            if page.rows >= self._page:
                break  # a big window: one page per turn, the loop comes back at once
        if self.at != self._saved and (time.monotonic() - self._saved_at > _OFFSET_EVERY):
            await event_log.advance_offset(self._conn, CHECK, self.at)
            self._saved, self._saved_at = self.at, time.monotonic()
        return rows

    async def accept(self, page: Page, hand: Callable[[Page], None]) -> int:
        """The next page after ``at``: its dead letters filed, then handed on;
        returns its rows."""
        if page.rejected:
            await self._file(page)
        self.at = page.reached
        hand(page)
        return page.rows

    async def _file(self, page: Page) -> None:
        for rejected in page.rejected:
            shown_type = clip(rejected.event_type)
            log.warning(
                "dead-lettered event %s (%s v%s): %s",
                rejected.event_id, shown_type, rejected.schema_version, rejected.reason,
                extra={"event_id": str(rejected.event_id), "event_type": shown_type},
            )  # fmt: skip
        async with self._conn.transaction():
            await self._conn.execute(
                query("record_dead_letters"),
                {
                    "ids": [r.row_id for r in page.rejected],
                    "reasons": [r.reason for r in page.rejected],
                },
            )
            await event_log.advance_offset(self._conn, CHECK, page.reached)
        self._saved, self._saved_at = page.reached, time.monotonic()
