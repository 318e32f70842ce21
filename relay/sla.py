"""SLA / delay alerts: derived events, raised from PostgreSQL state, exactly once.

One replica at a time follows the windows of the log from the ``relay.sla``
offset (held with ``take_offset``: a second replica skips, never waits) and
keeps each open order's next deadline in ``relay_sla_deadlines``: paid → must
be accepted within ``not_accepted``; accepted → must be ready within
``not_ready``; ready → must be delivered by its ``estimatedDeliveryTime`` plus
``delivery_grace``. The awaited event replaces or clears the deadline, which
cancels the alert.

Each page of the log is read with ``relay.log.read`` (the events every reader
sees, already validated and rendered), reduced in Python to one change per
order, and applied with one statement in the transaction that advances the
offset, so a crash replays a page at most, never skips one. A due deadline
becomes an ``OrderDelayAlert`` outbox row in the same transaction that deletes
it, so the alert flows through the normal pipeline (restaurant stream, the
customer's order stream, resume, ordering) and a crash never doubles it.
Timers live in the database, so they survive restarts and replica changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import psycopg

from relay import log as event_log
from relay.db import sleep_or_stop
from relay.log import LogEvent, Page, Position
from relay.sessions import hold_session
from relay.sql import query

__all__ = ["SLA", "Change", "SlaConfig", "SlaWatcher", "deadline_changes"]

log = logging.getLogger("relay.sla")

SLA = "relay.sla"  # the watcher's offset in relay_offsets

# What each event type does to its order's deadline. Anything else
# (Preparing, the alerts themselves) leaves the current deadline standing.
_CLEARS = frozenset({"OrderDelivered", "OrderRejected", "OrderCancelled", "OrderPaymentFailed"})
_SETS = {"OrderPaymentSucceeded": "NotAccepted", "OrderAccepted": "NotReady"}
_READY = "OrderReadyForDelivery"
# Pages this process's recorder read, kept for the watcher's next step so it
# need not read and validate them again (a full queue drops the oldest: the
# watcher then reads those from the log).
_HANDED_PAGES = 4096


@dataclass(frozen=True)
class SlaConfig:
    not_accepted: timedelta = timedelta(minutes=3)
    not_ready: timedelta = timedelta(minutes=25)
    delivery_grace: timedelta = timedelta(0)
    scan_every: float = 1.0
    page_size: int = 1000  # rows of the log per transaction
    step_pages: int = 20  # pages per step before raising (and before the next step)


class Change(NamedTuple):
    """An order's new deadline (``kind``, counted from ``since``), or ``clear``."""

    order_id: UUID
    restaurant_id: UUID
    customer_id: UUID | None
    order_number: str | None
    kind: str  # "clear", "NotAccepted", "NotReady" or "DeliveryLate"
    since: datetime | None


def _time(data: dict[str, Any], key: str) -> datetime | None:
    """A timestamp of the rendered data (ISO-8601, UTC), or None if absent."""
    value = data.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # the relay rendered it, so this is a bug: never stop the watcher
        log.warning("unreadable %s %r in a rendered event", key, value[:40])
        return None


def _change(event: LogEvent) -> Change | None:
    """What one event does to its order's deadline; None if nothing."""
    if event.order_id is None:
        return None
    kind: str
    since: datetime | None = None
    data: dict[str, Any] = {}
    if event.event_type in _CLEARS:
        kind = "clear"
    elif event.event_type in _SETS or event.event_type == _READY:
        data = json.loads(event.data)
        if event.event_type == _READY:
            since = _time(data, "estimatedDeliveryTime")
            kind = "clear" if since is None else "DeliveryLate"
        else:
            since = _time(data, "lastUpdateTimestamp") or _time(data, "occurredOnUtc")
            if since is None:
                return None
            kind = _SETS[event.event_type]
    else:
        return None
    number = data.get("orderNumber")
    return Change(
        event.order_id,
        event.restaurant_id,
        event.customer_id,
        str(number) if isinstance(number, str | int) else None,
        kind,
        since,
    )


def deadline_changes(events: list[LogEvent]) -> list[Change]:
    """Each order's last deadline-changing event among ``events`` (in log order)."""
    latest: dict[UUID, Change] = {}
    for event in events:
        change = _change(event)
        if change is not None:
            latest[change.order_id] = change
    return list(latest.values())


class SlaWatcher:
    def __init__(self, database_url: str, config: SlaConfig | None = None) -> None:
        self._url = database_url
        self.config = config or SlaConfig()
        self.raised = 0
        self.events = 0  # events this watcher applied
        self.writes = 0  # deadline rows it wrote for them
        self.behind = False  # the last step stopped before the newest window
        self._handed: deque[Page] = deque(maxlen=_HANDED_PAGES)

    def handed(self, page: Page) -> None:
        """A page this process's recorder read (used when it continues the offset)."""
        self._handed.append(page)

    def _in_hand(self, at: Position) -> tuple[list[LogEvent], Position] | None:
        """The handed pages that continue ``at``, as one page; None if none does."""
        handed = self._handed
        while handed and handed[0].reached <= at:
            handed.popleft()  # already applied (by this or another replica)
        events: list[LogEvent] = []
        reached = at
        while handed and handed[0].after == reached and len(events) < self.config.page_size:
            page = handed.popleft()
            events.extend(page.events)
            reached = page.reached
        return (events, reached) if reached != at else None

    async def run(self, stop: asyncio.Event) -> None:
        async def follow(conn: psycopg.AsyncConnection[Any]) -> None:
            while not stop.is_set():
                await asyncio.wait_for(self.step(conn), 60)  # half-open: reconnect
                if not self.behind:
                    await sleep_or_stop(stop, self.config.scan_every)

        await hold_session(self._url, stop, follow, label="sla", logger=log)

    async def step(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Apply the log up to its newest window (at most ``step_pages``
        pages: a backlog is taken in bounded steps), then raise what is due;
        returns alerts raised (0 when another replica holds the watcher).

        One transaction per page; the last one also raises, so the guard
        against unread rows sees the offset it has just advanced.
        """
        pages = 0
        while True:
            async with conn.transaction():
                at = await event_log.take_offset(conn, SLA)
                if at is None:
                    return 0
                pages += 1
                self.behind = not await self._apply_page(conn, at)
                if self.behind and pages < self.config.step_pages:
                    continue
                cur = await conn.execute(query("sla_raise_due"), {"limit": 100})
                raised = await cur.fetchall()
            break
        for order_id, kind in raised:
            log.info("delay alert %s for order %s", kind, order_id)
        self.raised += len(raised)
        return len(raised)

    async def _apply_page(self, conn: psycopg.AsyncConnection[Any], at: Position) -> bool:
        """Apply the next page after ``at`` and advance the offset past it;
        returns whether the watcher has reached the newest window."""
        head = await event_log.head(conn)
        at = max(at, head.oldest)  # retention passed the offset: resume at the oldest row
        if at >= head.end:
            return True
        in_hand = self._in_hand(at)
        if in_hand is None:
            page = await event_log.read(conn, at, head.window, limit=self.config.page_size)
            events, reached = page.events, page.reached
        else:
            events, reached = in_hand
        changes = deadline_changes(events)
        if changes:
            cfg = self.config
            cur = await conn.execute(
                query("sla_apply"),
                {
                    "orders": [c.order_id for c in changes],
                    "restaurants": [c.restaurant_id for c in changes],
                    "customers": [c.customer_id for c in changes],
                    "numbers": [c.order_number for c in changes],
                    "kinds": [c.kind for c in changes],
                    "since": [c.since for c in changes],
                    "not_accepted": cfg.not_accepted,
                    "not_ready": cfg.not_ready,
                    "delivery_grace": cfg.delivery_grace,
                },
            )
            row = await cur.fetchone()
            self.writes += int(row[0]) if row else 0
        self.events += len(events)
        await event_log.advance_offset(conn, SLA, reached)
        return reached >= head.end
