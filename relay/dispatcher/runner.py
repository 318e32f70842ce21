"""The dispatcher loop: wake up, claim and publish batches, survive outages.

Wake-up (MEASURED.md: a NOTIFY in each producer commit costs producers ~40%):

* ``poll`` (default): a batch that hit its limit is followed by the next claim
  at once; a partial one by a claim after a linger that grows with the batch,
  up to ``linger`` (fewer, larger transactions under heavy live load). When
  nothing is pending, probe the outbox's identity sequence (microseconds, no
  cost to producers) with a back-off from 0.5 ms to ``poll_idle``, and to
  5 x ``poll_idle`` after a second without events. A sequence bump starts a
  short *chase* of real claims, since the inserting transaction may not have
  committed yet when the probe saw its id.
* ``notify``: a statement trigger NOTIFYs ``relay_outbox``; a dedicated
  listener wakes the loop. Polling continues at ``poll_idle`` while the
  listener is down.

Either way a full claim runs at least every ``safety_sweep``, so a lost
notification or a missed bump only delays an event, never strands it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg

from relay.dispatcher.batch import claim_and_publish
from relay.log import BatchResult
from relay.sessions import Listener, hold_session
from relay.sql import query

__all__ = ["Dispatcher", "DispatcherConfig"]

log = logging.getLogger("relay.dispatcher")

_CHASE_SECONDS = 0.1
_FIRST_BACKOFF = 0.0005
# After this long without an event the probe slows to _DEEP_IDLE x poll_idle:
# each probe is a few system calls (an idle relay's main cost), and traffic
# that has been silent for a second can afford a few more milliseconds.
_DEEP_IDLE_AFTER = 1.0
_LINGER_PER_EVENT = 0.00025
_DEEP_IDLE = 5


@dataclass(frozen=True)
class DispatcherConfig:
    batch_size: int = 500
    backlog_partitions: int = 16  # partitions per batch in a backlog
    wakeup: str = "poll"
    poll_idle: float = 0.010
    # After a partial batch: 0.25 ms per event of it, up to this (issue 12).
    # The cap only binds above ~4,000 events/s; there 25 ms measured 0.78x
    # producer throughput against 0.67x at 5 ms, and 50 or 100 ms no better.
    linger: float = 0.025
    safety_sweep: float = 1.0
    # Client-side bound on any one round trip: a half-open connection (a
    # network that silently drops packets) must not stall the loop forever.
    query_timeout: float = 30.0
    session_settings: dict[str, str] = field(
        default_factory=lambda: {
            # A stuck or paused dispatcher must not hold partition locks for long.
            "idle_in_transaction_session_timeout": "15s",
            "statement_timeout": "30s",
            "lock_timeout": "5s",
        }
    )


class Dispatcher:
    """Runs until ``stop`` is set; ``on_batch`` sees each committed batch."""

    def __init__(
        self,
        database_url: str,
        config: DispatcherConfig | None = None,
        *,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self._url = database_url
        self.config = config or DispatcherConfig()
        self._on_batch = on_batch
        self._wake = asyncio.Event()
        self.running = False
        self.backend_pid: int | None = None  # of the claiming connection (hub skips its NOTIFYs)
        self.published = 0
        self.dead_lettered = 0
        self._listener: Listener | None = None

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
            await self._run_connected(stop)
        finally:
            self.running = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_connected(self, stop: asyncio.Event) -> None:
        await hold_session(
            self._url, stop, partial(self._serve, stop=stop), label="dispatcher", logger=log
        )

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
        probe = query("probe_outbox")
        last_seq: int | None = None
        chase_until = 0.0
        last_event = loop.time()
        next_sweep = loop.time() + cfg.safety_sweep
        backoff = _FIRST_BACKOFF
        claim = True
        while not stop.is_set():
            if claim:
                async with asyncio.timeout(cfg.query_timeout):
                    result = await claim_and_publish(
                        conn, batch_size=cfg.batch_size, backlog_partitions=cfg.backlog_partitions
                    )
                now = loop.time()
                next_sweep = now + cfg.safety_sweep
                # ``more`` without rows: only stale partitions, whose rows are
                # still pending (another replica is publishing: events flow).
                if result.claimed or result.more:
                    self._published(result)
                    last_event = now
                    chase_until = now + _CHASE_SECONDS
                    backoff = _FIRST_BACKOFF
                    # A batch that hit a limit means a backlog: claim again at
                    # once (after letting the gateway breathe). A partial one
                    # means live producers: claim again after a linger that
                    # grows with the batch (a claim costs ~0.6 ms of CPU
                    # however few rows it moves): at a few events per claim
                    # latency wins, at thousands per second CPU does.
                    linger = min(cfg.linger, _LINGER_PER_EVENT * result.claimed)
                    await asyncio.sleep(0 if result.more else linger)
                    continue
            # Nothing claimed: wait for a reason to claim again.
            await self._pause(stop, backoff)
            now = loop.time()
            deep = now - last_event > _DEEP_IDLE_AFTER
            backoff = min(backoff * 2, cfg.poll_idle * (_DEEP_IDLE if deep else 1))
            if now >= next_sweep or self._wake.is_set():
                self._wake.clear()
                claim = True
            elif now < chase_until:
                claim = True
            elif cfg.wakeup == "poll" or not self.listener_connected:
                async with asyncio.timeout(cfg.query_timeout):
                    cur = await conn.execute(probe, prepare=True)
                    row = await cur.fetchone()
                seq = int(row[0]) if row else 0
                claim = last_seq is not None and seq != last_seq
                if claim:
                    chase_until = now + _CHASE_SECONDS
                last_seq = seq
            else:
                claim = False

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        if self.config.wakeup != "notify":
            # Poll mode: a plain timer (the loop checks ``stop``). No tasks per
            # pause: an idle relay pauses a hundred times a second.
            await asyncio.sleep(seconds)
            return
        if self.listener_connected:
            seconds = self.config.safety_sweep
        wake = asyncio.ensure_future(self._wake.wait())
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({wake, halt}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            halt.cancel()

    def _published(self, result: BatchResult) -> None:
        self.published += len(result.events)
        self.dead_lettered += result.dead_lettered
        if self._on_batch is not None:
            try:
                self._on_batch(result)
            except Exception:
                log.exception("error handing a published batch to the gateway")
