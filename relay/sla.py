"""SLA / delay alerts: derived events, raised from the log, exactly once, with no write per event.

One replica at a time (the recorder's, and under the ``relay.sla`` offset
taken with ``take_offset``: a second replica skips, never waits) follows the
windows of the log and keeps each open order's next deadline **in memory**:
paid → must be accepted within ``not_accepted``; accepted → must be ready
within ``not_ready``; ready → must be delivered by its
``estimatedDeliveryTime`` plus ``delivery_grace``. The awaited event replaces
or clears the deadline, which cancels the alert.

Nothing is written per event. The memory is a function of the log, so a new
leader (or a restarted one) rebuilds it by reading the log again from the
*replay point*: just before the oldest open deadline's event, kept in
``relay_offsets`` (``relay.sla.replay``) and moved at most once per step.
Deadlines due further ahead than ``park_beyond`` after their event (a
delivery estimate days away) would pin that point past retention, so they
are *parked*: also stored in ``relay_sla_deadlines``, which a rebuild loads
first. Whether a deadline is parked depends on its event alone, so every
rebuild decides alike.

A due deadline becomes an ``OrderDelayAlert`` outbox row whose event id is
derived from (order, kind, due time): the alert flows through the normal
pipeline (restaurant stream, the customer's order stream, resume, ordering),
and a rebuilt watcher that raises it again adds nothing. Reading the alert
back from the log closes the deadline on every rebuild.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg

from relay import log as event_log
from relay.db import sleep_or_stop
from relay.log import LogEvent, Page, Position
from relay.sessions import hold_session
from relay.sql import query

__all__ = ["REPLAY", "SLA", "Deadline", "SlaConfig", "SlaWatcher"]

log = logging.getLogger("relay.sla")

SLA = "relay.sla"  # the watcher's offset in relay_offsets
REPLAY = "relay.sla.replay"  # where a rebuild of the open deadlines starts reading

# What each event type does to its order's deadline: clears it, checks it
# off (an alert already raised), or sets the next one of a kind. Anything
# else (Preparing) leaves the current deadline standing.
_CLEAR = "clear"
_RAISED = "raised"
_EFFECT = {
    "OrderDelivered": _CLEAR,
    "OrderRejected": _CLEAR,
    "OrderCancelled": _CLEAR,
    "OrderPaymentFailed": _CLEAR,
    "OrderDelayAlert": _RAISED,
    "OrderPaymentSucceeded": "NotAccepted",
    "OrderAccepted": "NotReady",
    "OrderReadyForDelivery": "DeliveryLate",  # or clears: no estimate, no deadline
}
_KINDS = ("NotAccepted", "NotReady", "DeliveryLate")  # as relay_sla_thresholds' columns
# Pages this process's recorder read, kept for the watcher's next step so it
# need not read and validate them again (a full queue drops the oldest: the
# watcher then reads those from the log).
_HANDED_PAGES = 4096
_RAISE_AT_MOST = 500  # alerts per step
_APPLY_SLICE = 100  # events applied between two turns of the event loop


@dataclass(frozen=True)
class SlaConfig:
    not_accepted: timedelta = timedelta(minutes=3)
    not_ready: timedelta = timedelta(minutes=25)
    delivery_grace: timedelta = timedelta(0)
    park_beyond: timedelta = timedelta(hours=12)  # keep RELAY_RETENTION / 2 or less
    scan_every: float = 1.0
    page_size: int = 1000  # rows of the log per transaction
    step_pages: int = 20  # pages per step before raising (and before the next step)


class Deadline(NamedTuple):
    """An open order's next deadline, and the event that set it."""

    kind: str  # "NotAccepted", "NotReady" or "DeliveryLate"
    due: datetime
    restaurant_id: str
    customer_id: str | None
    order_number: str | None
    since: Position | None  # None: loaded from relay_sla_deadlines
    parked: bool


class _Thresholds:
    """Each kind's threshold for a restaurant: its override, else the default."""

    def __init__(self, config: SlaConfig, rows: list[tuple[Any, ...]]) -> None:
        defaults = (config.not_accepted, config.not_ready, config.delivery_grace)
        self._default = dict(zip(_KINDS, defaults, strict=True))
        self._by_restaurant: dict[str, dict[str, timedelta]] = {}
        for restaurant, *limits in rows:
            kinds = zip(_KINDS, limits, strict=True)
            self._by_restaurant[restaurant] = {k: v for k, v in kinds if v is not None}

    def __call__(self, restaurant: str, kind: str) -> timedelta:
        override = self._by_restaurant.get(restaurant)
        if override is not None and kind in override:
            return override[kind]
        return self._default[kind]


class _Park(NamedTuple):
    """A change to relay_sla_deadlines: ``kind`` "clear" deletes the order's row."""

    order_id: str
    restaurant_id: str
    customer_id: str | None
    order_number: str | None
    kind: str
    due: datetime | None


class OpenDeadlines:
    """The open deadlines as of log position ``at``, in the order their events came.

    Not parked deadlines are kept in event order (a dict keeps insertion
    order; a replaced deadline moves to the end), so the oldest one, which
    fixes the replay point, is the first. A heap orders every deadline by due
    time; entries a later event replaced are dropped when they surface.
    """

    def __init__(self, at: Position) -> None:
        self.at = at
        self._open: dict[str, Deadline] = {}
        self._parked: dict[str, Deadline] = {}
        self._by_due: list[tuple[datetime, int, str]] = []
        self._pushed = 0

    def __len__(self) -> int:
        return len(self._open) + len(self._parked)

    def get(self, order: str) -> Deadline | None:
        return self._open.get(order) or self._parked.get(order)

    def items(self) -> list[tuple[str, Deadline]]:
        return [*self._parked.items(), *self._open.items()]

    @property
    def replay_point(self) -> Position:
        """A rebuild reading the log after this position restores every
        deadline that is not parked."""
        for deadline in self._open.values():
            since = deadline.since
            if since is not None:  # always, for a deadline that is not parked
                return Position(since.window, since.xid, since.id - 1)
        return self.at

    def put(self, order: str, deadline: Deadline) -> None:
        """Open (or replace) the order's deadline: it is now the newest."""
        self.drop(order)
        self._open_new(order, deadline)

    def _open_new(self, order: str, deadline: Deadline) -> None:
        """``put`` for an order with no deadline open (just dropped)."""
        (self._parked if deadline.parked else self._open)[order] = deadline
        self.remind(order, deadline)

    def drop(self, order: str) -> Deadline | None:
        return self._open.pop(order, None) or self._parked.pop(order, None)

    def due(self, now: datetime, limit: int) -> list[tuple[str, Deadline]]:
        """Deadlines due by ``now``, earliest first. They stay open, but off
        the due-time heap: ``remind`` of the ones not raised."""
        found: dict[str, Deadline] = {}
        heap = self._by_due
        while heap and heap[0][0] <= now and len(found) < limit:
            due, _, order = heapq.heappop(heap)
            deadline = self.get(order)
            if deadline is not None and deadline.due == due:
                found[order] = deadline
        return list(found.items())

    def remind(self, order: str, deadline: Deadline) -> None:
        """Put a due deadline back on the heap (its place in event order stays)."""
        self._pushed += 1
        heapq.heappush(self._by_due, (deadline.due, self._pushed, order))

    def apply(
        self, event: LogEvent, threshold: Callable[[str, str], timedelta], park_beyond: timedelta
    ) -> _Park | None:
        """Apply one event; returns the change to relay_sla_deadlines it
        needs, if the order's deadline is or was parked."""
        order = event.order_id
        if order is None:
            return None
        kind = _EFFECT.get(event.event_type)
        if kind is None:
            return None
        # The validated model's facts (``EventSpec.deadline_from``): no JSON is read.
        since = event.deadline_from
        due: datetime | None = None
        if kind == _RAISED:
            current = self.get(order)
            # The relay rendered the alert itself: its kind is spelled so.
            if current is None or f'"kind":"{current.kind}"' not in event.data:
                return None
            if since != current.due:
                return None  # an alert for an earlier deadline of the same kind
            kind = _CLEAR  # already raised: by this watcher or one before it
        elif kind != _CLEAR:
            if since is not None:
                due = since + threshold(event.restaurant_id, kind)
            elif kind == "DeliveryLate":
                kind = _CLEAR  # ready with no delivery estimate: nothing to be late for
            else:
                return None
        previous = self.drop(order)
        if due is None:
            if previous is None or not previous.parked:
                return None
            return _Park(order, previous.restaurant_id, None, None, _CLEAR, None)
        parked = due - event.enqueued_at > park_beyond
        # tuple.__new__: without the named tuple's own (Python) __new__, per event.
        deadline = tuple.__new__(Deadline, (
            kind, due, event.restaurant_id, event.customer_id, event.order_number, event.at, parked
        ))  # fmt: skip
        self._open_new(order, deadline)  # its previous deadline was dropped above
        if deadline.parked:
            return _Park(
                order, event.restaurant_id, deadline.customer_id, deadline.order_number,
                deadline.kind, due,
            )  # fmt: skip
        if previous is not None and previous.parked:
            return _Park(order, previous.restaurant_id, None, None, _CLEAR, None)
        return None


class SlaWatcher:
    def __init__(
        self,
        database_url: str,
        config: SlaConfig | None = None,
        *,
        local_check: Callable[[], Position | None] | None = None,
    ) -> None:
        """``local_check`` is how far this process's recorder has checked
        the log while it leads, None while it does not: the watcher then
        watches only while it leads (the pages come in hand, and the open
        deadlines stay warm in one process) and never reads ahead of the
        check. Without it the watcher runs whenever the offset is free."""
        self._url = database_url
        self.config = config or SlaConfig()
        self._local_check = local_check
        self.raised = 0
        self.events = 0  # events this watcher applied
        self.writes = 0  # relay_sla_deadlines rows it wrote for them (parked only)
        self.rebuilds = 0
        self.behind = False  # the last step stopped before the newest window
        self._handed: deque[Page] = deque(maxlen=_HANDED_PAGES)
        self._state: OpenDeadlines | None = None
        self._replay_saved: Position | None = None

    def handed(self, page: Page) -> None:
        """A page this process's recorder read (used when it continues the offset)."""
        self._handed.append(page)

    def deadlines(self) -> dict[str, Deadline]:
        """The open deadlines as of the last step (empty before the first)."""
        return dict(self._state.items()) if self._state is not None else {}

    def _in_hand(self, at: Position) -> tuple[list[LogEvent], Position] | None:
        """The handed pages that continue ``at``, as one page; None if none does."""
        handed = self._handed
        while handed and handed[0].reached <= at:
            handed.popleft()  # already applied (by this or another replica)
        events: list[LogEvent] = []
        reached = at
        # A page may start before ``at`` (the watcher read part of it from
        # the log): its events after ``at`` continue the watcher's position.
        while handed and handed[0].after <= reached and len(events) < self.config.page_size:
            page = handed.popleft()
            if page.after >= reached:  # the usual case: the page continues the position
                events.extend(page.events)
            else:
                events.extend(e for e in page.events if e.at > reached)
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
        against unread rows sees the offset it has just advanced. Memory
        changes before the commit: if a step fails, the memory is dropped
        and the next step rebuilds it from what committed.
        """
        if self._local_check is not None and self._local_check() is None:
            self._state = None  # another replica leads: this memory goes stale
            return 0
        try:
            return await self._step(conn)
        except BaseException:
            self._state = None
            raise

    async def _step(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(query("sla_thresholds"))
        threshold = _Thresholds(self.config, await cur.fetchall())
        pages = 0
        while True:
            async with conn.transaction():
                at = await event_log.take_offset(conn, SLA)
                if at is None:
                    self._state = None
                    return 0
                state = self._state
                if state is None or state.at != at:
                    state = self._state = await self._rebuild(conn, at, threshold)
                pages += 1
                self.behind = not await self._apply_page(conn, state, threshold)
                last = not self.behind or pages >= self.config.step_pages
                raised = await self._raise(conn, state) if last else []
                await self._save_replay_point(conn, state)
            if last:
                break
        for order_id, kind in raised:
            log.info("delay alert %s for order %s", kind, order_id)
        self.raised += len(raised)
        return len(raised)

    async def _rebuild(
        self, conn: psycopg.AsyncConnection[Any], at: Position, threshold: _Thresholds
    ) -> OpenDeadlines:
        """The open deadlines as of ``at``: the parked ones, then the log
        read again from the replay point (its parked changes are re-applied:
        they write nothing when they match)."""
        replay = await event_log.take_offset(conn, REPLAY, start=at)
        assert replay is not None  # held only inside the SLA offset's transaction
        head = await event_log.head(conn)
        if replay < head.oldest:
            log.warning(
                "SLA replay point %s is below retention (oldest %s): deadlines set in "
                "between are lost; RELAY_RETENTION should exceed the longest deadline",
                replay.encode(),
                head.oldest.encode(),
            )
        state = OpenDeadlines(max(min(replay, at), head.oldest))
        cur = await conn.execute(query("sla_parked"))
        for order, restaurant, customer, number, kind, due in await cur.fetchall():
            state.put(order, Deadline(kind, due, restaurant, customer, number, None, parked=True))
        read = 0
        while state.at < at:
            page = await event_log.read(conn, state.at, at.window, limit=self.config.page_size)
            events = [e for e in page.events if e.at <= at]
            await self._apply(conn, state, events, threshold)
            read += len(events)
            state.at = min(page.reached, at)
            if page.reached == page.after:
                break  # nothing more to read below the offset
        state.at = at
        self.rebuilds += 1
        self._replay_saved = replay
        log.info("SLA deadlines rebuilt: %d open, %d events read again", len(state), read)
        return state

    async def _apply(
        self,
        conn: psycopg.AsyncConnection[Any],
        state: OpenDeadlines,
        events: list[LogEvent],
        threshold: _Thresholds,
    ) -> None:
        park_beyond = self.config.park_beyond
        changes: dict[str, _Park] = {}
        for n, event in enumerate(events, 1):
            change = state.apply(event, threshold, park_beyond)
            if change is not None:
                changes[change.order_id] = change
            if n % _APPLY_SLICE == 0:
                # The recorder shares this event loop: a page applied in one
                # go held its next window back by milliseconds.
                await asyncio.sleep(0)
        if not changes:
            return
        values = list(changes.values())
        cur = await conn.execute(
            query("sla_park"),
            {
                "orders": [c.order_id for c in values],
                "restaurants": [c.restaurant_id for c in values],
                "customers": [c.customer_id for c in values],
                "numbers": [c.order_number for c in values],
                "kinds": [c.kind for c in values],
                "due": [c.due for c in values],
            },
        )
        row = await cur.fetchone()
        self.writes += int(row[0]) if row else 0

    async def _apply_page(
        self, conn: psycopg.AsyncConnection[Any], state: OpenDeadlines, threshold: _Thresholds
    ) -> bool:
        """Apply the next page after the state's position and advance the
        offset past it; returns whether the watcher has reached the newest window."""
        head = await event_log.head(conn)
        if state.at < head.oldest:  # retention passed the offset: resume at the oldest row
            state.at = head.oldest
        at = state.at
        end = head.end
        checked = self._local_check() if self._local_check is not None else None
        if checked is not None and checked < end:
            end = checked  # the check hands the rest over: no read of it here
        if at >= end:
            return True
        in_hand = self._in_hand(at)
        if in_hand is None:
            # Pages the check handed and this queue dropped: read them, but no
            # further than the window the check has reached.
            page = await event_log.read(conn, at, end.window, limit=self.config.page_size)
            events, reached = page.events, page.reached
        else:
            events, reached = in_hand
        await self._apply(conn, state, events, threshold)
        self.events += len(events)
        state.at = reached
        await event_log.advance_offset(conn, SLA, reached)
        return reached >= end

    async def _raise(
        self, conn: psycopg.AsyncConnection[Any], state: OpenDeadlines
    ) -> list[tuple[str, str]]:
        """Raise the deadlines that are due and whose orders have nothing unread."""
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
        assert row is not None
        candidates = state.due(row[0], _RAISE_AT_MOST)
        if not candidates:
            return []
        cur = await conn.execute(
            query("sla_raise"),
            {
                "orders": [o for o, _ in candidates],
                "restaurants": [d.restaurant_id for _, d in candidates],
                "customers": [d.customer_id for _, d in candidates],
                "numbers": [d.order_number for _, d in candidates],
                "kinds": [d.kind for _, d in candidates],
                "due": [d.due for _, d in candidates],
            },
        )
        settled = {order: (kind, new) for order, kind, new in await cur.fetchall()}
        raised: list[tuple[str, str]] = []
        for order, deadline in candidates:
            if order in settled:
                state.drop(order)
                kind, new = settled[order]
                if new:
                    raised.append((order, kind))
            else:
                state.remind(order, deadline)  # waits for the order's unread rows
        return raised

    async def _save_replay_point(
        self, conn: psycopg.AsyncConnection[Any], state: OpenDeadlines
    ) -> None:
        point = state.replay_point
        if point != self._replay_saved:
            await event_log.advance_offset(conn, REPLAY, point)
            self._replay_saved = point
