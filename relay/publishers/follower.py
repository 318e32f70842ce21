"""One external publisher: follow the log's snapshot windows into a broker.

Exactly one relay process publishes for a given publisher name at a time: it
holds a session advisory lock on its database connection, so a crashed
leader's lock goes with its connection and a standby takes over. Its one
durable offset (``relay_offsets`` row ``publisher:{name}``) moves past a page
of the log only after the broker confirmed (or refused for good) every
message of it; a crash in between republishes the page, which brokers drop
by message id (= event id): at-least-once, never a gap. The leader polls the
log's head every ``idle`` seconds when it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import tenacity

from relay import log as event_log
from relay.db import sleep_or_stop
from relay.log import Position
from relay.metrics import M
from relay.publishers.base import Broker, Message, Outcome
from relay.publishers.config import PublisherConfig
from relay.sessions import LOST, hold_session
from relay.sql import query

__all__ = ["Follower", "PublisherState"]

log = logging.getLogger("relay.publishers")

State = Literal["starting", "standby", "publishing", "broker unavailable", "database unavailable"]


@dataclass
class PublisherState:
    """What ``/readyz`` reports for one publisher."""

    state: State = "starting"
    lag: int | None = None  # snapshot windows still to deliver, whole or in part
    published: int = 0
    rejected: int = 0
    last_error: str | None = None

    def report(self) -> dict[str, Any]:
        # A broker outage never makes the relay unready: SSE keeps flowing.
        return {"ok": True, "state": self.state, "lag": self.lag, "published": self.published,
                "rejected": self.rejected, "last_error": self.last_error}  # fmt: skip


class _Stopped(Exception):
    pass


class Follower:
    def __init__(
        self,
        database_url: str,
        config: PublisherConfig,
        broker: Broker,
        *,
        batch_size: int = 500,
        idle: float = 0.1,
        standby_retry: float = 2.0,
        query_timeout: float = 15.0,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.broker = broker
        self.batch_size = batch_size
        self.idle = idle
        self.standby_retry = standby_retry
        self.query_timeout = query_timeout
        self.follower = f"publisher:{config.name}"  # its relay_offsets row
        self.status = PublisherState()
        self._broker_connected = False
        self._outage_started: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        async def publish(conn: psycopg.AsyncConnection[Any]) -> None:
            if await self._lead(conn, stop):
                await self._follow(conn, stop)

        def lost(_exc: BaseException) -> None:
            self.status.state = "database unavailable"

        try:
            await hold_session(
                self.database_url, stop, publish, label=f"publisher {self.config.name}",
                logger=log, lost=(psycopg.Error, *LOST), on_lost=lost,
            )  # fmt: skip
        except _Stopped:
            return
        finally:
            await self.broker.close()

    async def _lead(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        """Wait to become this publisher's only process; False when stopped first."""
        announced = False
        while not stop.is_set():
            async with asyncio.timeout(self.query_timeout):
                cur = await conn.execute(query("publisher_lock"), {"publisher": self.config.name})
                row = await cur.fetchone()
            if row and row[0]:
                log.info("publisher %s: publishing from this process", self.config.name)
                return True
            if not announced:
                log.info("publisher %s: standby (another relay publishes)", self.config.name)
                announced = True
            self.status.state = "standby"
            await sleep_or_stop(stop, self.standby_retry)
        return False

    async def _follow(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        offset = await self._offset(conn)
        await self._deliver([], stop)  # connect now: readiness shows the broker's state
        while not stop.is_set():
            async with asyncio.timeout(self.query_timeout):
                top = await event_log.head(conn)
            # An offset older than retention resumes at the oldest retained event.
            offset = max(offset, top.oldest)
            self._lag(offset, top.window)
            if offset >= top.end:
                await sleep_or_stop(stop, self.idle)
                continue
            while offset < top.end and not stop.is_set():
                reached = await self._step(conn, offset, top.window, stop)
                if reached <= offset:  # a read never stalls; if one did, look again later
                    await sleep_or_stop(stop, self.idle)
                    break
                offset = reached
                self._lag(offset, top.window)

    async def _offset(self, conn: psycopg.AsyncConnection[Any]) -> Position:
        """This publisher's durable offset; a new one starts at the oldest retained event."""
        async with asyncio.timeout(self.query_timeout):
            async with conn.transaction():
                offset = await event_log.take_offset(conn, self.follower)
            if offset is None:  # someone holds the row (not a relay: we hold the lead)
                offset = await event_log.read_offset(conn, self.follower)
        assert offset is not None
        return offset

    def _lag(self, offset: Position, window: int) -> None:
        """Windows still to deliver, whole or in part (``publisher_lag``'s measure)."""
        done = offset.window if offset.whole else offset.window - 1
        self.status.lag = max(window - done, 0)
        M.broker_lag.labels(publisher=self.config.name).set(self.status.lag)

    async def _step(
        self, conn: psycopg.AsyncConnection[Any], after: Position, through: int, stop: asyncio.Event
    ) -> Position:
        """Publish the next page of the log; move the offset once the broker has
        confirmed (or refused for good) every message of it. Returns the new offset."""
        async with asyncio.timeout(self.query_timeout):
            page = await event_log.read(conn, after, through, limit=self.batch_size)
        # Rejected rows are skipped: the recorder files them as dead letters.
        batch = [Message.of(e) for e in page.events if self.config.accepts(e.event_type)]
        outcomes = await self._deliver(batch, stop)
        rejected = [(m, why) for m, why in zip(batch, outcomes, strict=True) if why is not None]
        async with asyncio.timeout(self.query_timeout), conn.transaction():
            for message, why in rejected:
                await conn.execute(
                    query("publisher_dead_letter"),
                    {"publisher": self.config.name, "event_id": message.event_id,
                     "event_type": message.event_type, "reason": why},
                )  # fmt: skip
            if page.reached > after:
                await event_log.advance_offset(conn, self.follower, page.reached)
        confirmed = len(batch) - len(rejected)
        self.status.published += confirmed
        self.status.rejected += len(rejected)
        M.broker_published.labels(publisher=self.config.name).inc(confirmed)
        for message, why in rejected:
            M.broker_rejected.labels(publisher=self.config.name).inc()
            log.error("publisher %s: event %s (%s) refused for good, dead-lettered: %s",
                      self.config.name, message.event_id, message.event_type, why)  # fmt: skip
        return page.reached

    async def _deliver(self, batch: list[Message], stop: asyncio.Event) -> list[Outcome]:
        """Publish until the broker confirms the batch; back off while it is away."""
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_not_exception_type(_Stopped),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.5),
            sleep=lambda seconds: sleep_or_stop(stop, seconds),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if stop.is_set():
                    raise _Stopped
                try:
                    if not self._broker_connected:
                        await self.broker.connect()
                        self._broker_connected = True
                    outcomes = await self.broker.publish(batch) if batch else []
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # we are being stopped
                    # A broker client cancelled one of its own futures on a
                    # lost connection: an outage like any other.
                    await self._broker_failed(exc)
                    raise ConnectionError("broker client cancelled the publish") from None
                except Exception as exc:  # any broker failure is retried
                    await self._broker_failed(exc)
                    raise
                self._broker_ok()
                return outcomes
        raise AssertionError("unreachable")  # pragma: no cover

    async def _broker_failed(self, exc: BaseException) -> None:
        reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        self.status.state = "broker unavailable"
        self.status.last_error = reason
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning("publisher %s: broker unavailable (%s); retrying with backoff, "
                        "SSE unaffected", self.config.name, reason)  # fmt: skip
        self._broker_connected = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.broker.close(), 5)

    def _broker_ok(self) -> None:
        self.status.state = "publishing"
        if self._outage_started is not None:
            log.info("publisher %s: broker reachable again after %.1f s",
                     self.config.name, time.monotonic() - self._outage_started)  # fmt: skip
            self._outage_started = None
            self.status.last_error = None
