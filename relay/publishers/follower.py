"""One external publisher: follow the event log from its durable offsets into a broker.

Exactly one relay process publishes for a given publisher name at a time: it
holds a session advisory lock on its database connection, so a crashed
leader's lock goes with its connection and a standby takes over. The offset
of a partition moves only after the broker confirmed (or refused for good)
every event up to it, in one UPDATE; a crash in between republishes the
batch, which brokers drop by message id (at-least-once, never a gap).
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

from relay.db import sleep_or_stop
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
    lag: int | None = None
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
        name = {"publisher": self.config.name}
        async with asyncio.timeout(self.query_timeout):
            await conn.execute(query("publisher_offsets_init"), name)
        await self._deliver([], stop)  # connect now: readiness shows the broker's state
        while not stop.is_set():
            async with asyncio.timeout(self.query_timeout):
                cur = await conn.execute(query("publisher_work"), name)
                work = await cur.fetchall()
            self.status.lag = sum(int(head) - int(after) for _p, after, head in work)
            M.broker_lag.labels(publisher=self.config.name).set(self.status.lag)
            if not work:
                await sleep_or_stop(stop, self.idle)
                continue
            for partition, after, _head in work:
                if stop.is_set():
                    return
                await self._drain_batch(conn, int(partition), int(after), stop)

    async def _drain_batch(
        self, conn: psycopg.AsyncConnection[Any], partition: int, after: int, stop: asyncio.Event
    ) -> None:
        async with asyncio.timeout(self.query_timeout):
            cur = await conn.execute(
                query("publisher_read"),
                {"partition": partition, "after": after, "limit": self.batch_size},
            )
            rows = await cur.fetchall()
        if not rows:
            return
        batch = [_message(r) for r in rows if self.config.accepts(r[3])]
        outcomes = await self._deliver(batch, stop)
        rejected = [(m, why) for m, why in zip(batch, outcomes, strict=True) if why is not None]
        async with asyncio.timeout(self.query_timeout), conn.transaction():
            for message, why in rejected:
                await conn.execute(
                    query("publisher_dead_letter"),
                    {"publisher": self.config.name, "event_id": message.event_id,
                     "partition": message.partition, "position": message.position,
                     "event_type": message.event_type, "reason": why},
                )  # fmt: skip
            await conn.execute(
                query("publisher_advance"),
                {"publisher": self.config.name, "partition": partition,
                 "position": int(rows[-1][1])},
            )  # fmt: skip
        confirmed = len(batch) - len(rejected)
        self.status.published += confirmed
        self.status.rejected += len(rejected)
        M.broker_published.labels(publisher=self.config.name).inc(confirmed)
        for message, why in rejected:
            M.broker_rejected.labels(publisher=self.config.name).inc()
            log.error("publisher %s: event %s (%s) refused for good, dead-lettered: %s",
                      self.config.name, message.event_id, message.event_type, why)  # fmt: skip

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


def _message(row: tuple[Any, ...]) -> Message:
    partition, position, event_id, event_type, version, restaurant, occurred, data = row
    return Message(partition=int(partition), position=int(position), event_id=event_id,
                   event_type=event_type, schema_version=int(version), restaurant_id=restaurant,
                   occurred_on_utc=occurred, body=data.encode())  # fmt: skip
