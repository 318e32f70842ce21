"""SSE streams and the polling fallback, over the hub and the event log.

Every stream kind (a restaurant, an order, finance, admin and coupons, a set
of restaurants, a customer's orders) runs the same loop, ``sse``, from a
``_Plan`` that says which channels it listens on, which rows its replay
reads and how its cursors are scoped.

Joining a stream without a gap or a duplicate: subscribe to the hub first
(live frames start buffering), then replay the log after the client's cursor
up to the head read meanwhile, then drain the buffer skipping every event at
or before the last position sent. Positions are global and the hub delivers
in log order, so "skip ``e.at <= sent``" is an exact dedupe at the seam
between replay and live, for every stream kind alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from relay import log as event_log
from relay.errors import InvalidCursor, LogPruned
from relay.gateway import frames
from relay.gateway.hub import Framed, Hub, Subscriber, frame
from relay.gateway.recent import Remembered as _Recalled
from relay.log import (
    Head,
    LogEvent,
    Position,
    Selector,
    Stream,
    customer_scope,
    restaurant_set_scope,
)
from relay.metrics import M

__all__ = [
    "DATABASE_TROUBLE",
    "CustomerOrders",
    "RestaurantSet",
    "StreamOptions",
    "Target",
    "page",
    "resolve_order",
    "sse",
]

log = logging.getLogger("relay.gateway")

_REPLAY_PAGE = 1000
_POLL_READ = 100  # rows per read of the polling page, at least (its events are a subset)
_IO_TIMEOUT = 15.0  # a read that takes longer is on a dead connection
# How often a stream waiting on a database read looks whether it was closed
# (shutdown, overflow): a slow read must not keep a stream past the shutdown grace.
_CLOSED_CHECK = 0.25

# A log read that failed (pool exhausted, database down, read timed out; psycopg
# wraps socket errors in OperationalError; or retention cut the log under a
# replay that had started above the cut): the stream ends with a retry hint
# and the client resumes by Last-Event-ID (a cursor below the cut then gets
# `reset`); a plain request answers 503.
DATABASE_TROUBLE = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, LogPruned)


@dataclass(frozen=True)
class StreamOptions:
    buffer: int = 1000
    retry_ms: int = 3000
    heartbeat: float = 15.0

    @property
    def send_timeout(self) -> float:
        """A write stuck this long is on a client that stopped reading: close it."""
        return max(10.0, 2 * self.heartbeat)


@dataclass(frozen=True)
class RestaurantSet:
    """The kitchen streams of several restaurants as one stream (a manager's
    whole set on one connection)."""

    restaurants: frozenset[UUID]


@dataclass(frozen=True)
class CustomerOrders:
    """Every order of one customer, including orders placed after it opened."""

    customer: UUID


# What an endpoint opens once access is granted.
Target = Stream | RestaurantSet | CustomerOrders


async def resolve_order(
    pool: AsyncConnectionPool[Any], order_id: UUID
) -> tuple[UUID, UUID | None] | None:
    """(restaurant_id, customer_id) of an order, or None if the relay never saw it."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        return await event_log.order_owner(conn, order_id)


# -- plans: what each stream kind listens on and reads --------------------------


class _Owners:
    """Which orders one customer owns, looked up once per order: the order's
    first event decides (as for order streams), so another restaurant's row
    that names the customer and reuses an order id never reaches them."""

    __slots__ = ("_customer", "_known")

    def __init__(self, customer: UUID) -> None:
        self._customer = customer
        self._known: dict[str, bool] = {}  # order channel -> owned by this customer

    def unknown(self, events: Iterable[LogEvent]) -> list[str]:
        return list(dict.fromkeys(c for e in events if (c := _order_of(e)) not in self._known))

    async def learn(self, conn: psycopg.AsyncConnection[Any], channels: list[str]) -> None:
        for channel in channels:
            _kind, restaurant, order = channel.split(":")
            owner = await event_log.order_owner(conn, UUID(order))
            self._known[channel] = owner == (UUID(restaurant), self._customer)

    def admits(self, event: LogEvent) -> bool:
        return self._known.get(_order_of(event), False)


def _order_of(event: LogEvent) -> str:
    """The event's order channel (``order:{restaurant}:{order}``), or ""."""
    return next((c for c in event.channels if c.startswith("order:")), "")


@dataclass(frozen=True, slots=True)
class _Plan:
    """One stream kind: its hub channels, the rows its replay reads, its
    cursor scope, and who decides which events it sends.

    A stream with no ``scope`` (one channel: a restaurant, an order, finance,
    admin, a coupon) sends the hub's frames as they are, shared by every
    subscriber: their id is the event's position. A stream over a chosen set
    (several restaurants, a customer's orders) carries its fingerprint in
    each frame's id, so one stream's cursor is reset, not half-honoured, by
    another.
    """

    channels: tuple[str, ...]
    selector: Selector
    scope: str = ""
    # Decides which events are sent (live and replay); None sends all.
    owners: _Owners | None = None

    def wants(self, event: LogEvent) -> bool:
        """Whether a replayed event belongs to this stream: the replay's
        selector reads by column, the channels decide (a restaurant's finance
        events are in its rows, not on its kitchen channel)."""
        return any(c in self.channels for c in event.channels)

    def admits(self, event: LogEvent) -> bool:
        return self.owners is None or self.owners.admits(event)

    def render(self, event: Framed, shared: bytes | None) -> bytes:
        """An event's frame, its position as the id."""
        if not self.scope:
            return shared if shared is not None else frame(event)
        return frames.event(event.at.encode(self.scope), event.sse_event, event.data)


def _plan(target: Target) -> _Plan:
    """The plan of a stream kind; shared by every stream of the same target
    (plans hold no per-stream state, except a customer's owned orders)."""
    if isinstance(target, CustomerOrders):
        return _customer_plan(target.customer)
    return _shared_plan(target)


@functools.lru_cache(maxsize=16384)
def _shared_plan(target: Stream | RestaurantSet) -> _Plan:
    if isinstance(target, RestaurantSet):
        ordered = tuple(sorted(target.restaurants))
        return _Plan(
            tuple(f"restaurant:{r}" for r in ordered),
            Selector(restaurants=ordered),
            scope=restaurant_set_scope(ordered),
        )
    # Admin and coupon streams read every row (Selector()) and keep their channel's.
    return _Plan((target.channel,), target.selector)


def _customer_plan(customer: UUID) -> _Plan:
    """A customer's orders: the events on ``customer:{id}`` (at any
    restaurant), of the orders this customer owns."""
    return _Plan(
        (f"customer:{customer}",),
        Selector(customer=customer),
        scope=customer_scope(customer),
        owners=_Owners(customer),
    )


# -- the one stream loop --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a stream begins: after ``after``; ``reset`` says why it could not resume."""

    after: Position
    head: Head  # the log's head when the cursor was resolved
    reset: str | None = None


async def _resolve(
    conn: psycopg.AsyncConnection[Any], plan: _Plan, cursor_text: str | None
) -> _Start:
    """Where a cursor resumes in the log, or why it cannot (then: at the head)."""
    head = await event_log.head(conn)
    if not cursor_text:
        return _Start(head.end, head)
    try:
        after = Position.parse(cursor_text, plan.scope)
    except InvalidCursor as exc:
        return _Start(head.end, head, str(exc))
    if after > head.end:
        return _Start(head.end, head, "cursor is ahead of the log (another database?)")
    if after < head.oldest:
        return _Start(head.end, head, "cursor is older than the retention window")
    return _Start(after, head)


def _joins_live(hub: Hub, plan: _Plan, cursor_text: str | None) -> Position | None:
    """The hub's position when the stream can start there with nothing to
    replay: a fresh stream, or a resume from exactly there (a caught-up
    dashboard reconnecting, e.g. to a restarted relay, on a quiet log)."""
    live = hub.live_position()
    if live is None or not cursor_text:
        return live  # None: the hub has not loaded the head yet
    try:
        resumed = Position.parse(cursor_text, plan.scope)
    except InvalidCursor:
        return None  # the log path answers with a reset and its reason
    return live if resumed == live else None


async def _hub_loading(hub: Hub, sub: Subscriber, every: float) -> AsyncIterator[bytes]:
    """Heartbeats until the hub has loaded the log's head (a relay just started).

    The hub starts at the head it loads: a stream that replayed through an
    earlier head would miss the windows in between. TimeoutError (the log
    cannot be read) if it takes longer than any read may; _Closed if the
    stream is closed meanwhile.
    """
    beat = _Beat(every)
    deadline = time.monotonic() + _IO_TIMEOUT
    while hub.live_position() is None:
        if sub.closed:
            raise _Closed
        if time.monotonic() > deadline:
            raise TimeoutError("the hub has not loaded the log's head")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hub.ready.wait(), min(_CLOSED_CHECK, beat.left()))
        if beat.due():
            yield frames.HEARTBEAT


class _Beat:
    """A heartbeat at least every ``every`` seconds, events or not (SPEC §4)."""

    __slots__ = ("_at", "_every")

    def __init__(self, every: float) -> None:
        self._every = every
        self._at = time.monotonic() + every

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._at:
            return False
        self._at = now + self._every
        return True

    def left(self) -> float:
        return max(0.0, self._at - time.monotonic())


class _Closed(Exception):
    """The subscriber was closed (shutdown, overflow) while the stream waited on the log."""


async def _reading(
    pool: AsyncConnectionPool[Any],
    sub: Subscriber,
    every: float,
    read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]],
    result: list[Any],
) -> AsyncIterator[bytes]:
    """Run ``read`` on a pooled connection, yielding heartbeats while it runs
    (a slow database must not look like a dead stream to a client or proxy).

    Raises _Closed, with the read cancelled, when the subscriber is closed
    meanwhile: waiting for the pool or a slow query must not outlive shutdown.
    """

    async def run() -> Any:
        async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
            return await read(conn)

    task = asyncio.ensure_future(run())
    try:
        beat = _Beat(every)
        while not task.done():
            await asyncio.wait({task}, timeout=min(_CLOSED_CHECK, beat.left()))
            if sub.closed and not task.done():
                raise _Closed
            if beat.due() and not task.done():
                yield frames.HEARTBEAT
        result.append(task.result())
    finally:
        if not task.done():
            # Cancelling a query waits for the server to confirm; a stream
            # being shut down waits a moment for that, never its whole grace.
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: it ended while being cancelled


async def sse(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    target: Target,
    cursor_text: str | None,
    *,
    options: StreamOptions,
    expires_at: datetime,
    subject: str,
) -> AsyncIterator[bytes]:
    """Yield SSE bytes for one subscriber until it is closed, slow, or its token
    expires; every way it ends leaves the client a way back (a retry hint or a
    comment saying why).

    A process holds ten thousand of these generators, so the live tail runs in
    this frame and keeps only what it needs (the plan, the subscriber, one
    position): the catch-up (cursor, replay pages) runs in a generator of its
    own that is gone once it is done.
    """
    plan = _plan(target)
    del target  # the plan holds what it needs, shared by every stream of the same target
    if len(plan.channels) == 1:
        sub = hub.subscribe(plan.channels[0], options.buffer, subject)
    else:
        sub = hub.subscribe_many(plan.channels, options.buffer, subject)
    try:
        if hub.live_position() is None:
            async for beat in _hub_loading(hub, sub, options.heartbeat):
                yield beat
        sent = _joins_live(hub, plan, cursor_text)
        if sent is None:
            caught_up: list[Position] = []
            async for chunk in _catch_up(hub, pool, sub, plan, cursor_text, options, caught_up):
                yield chunk
            sent = caught_up[0]
        else:
            # Nothing to replay: no query, so a thousand dashboards (re)opening
            # at once cost the pool nothing.
            yield frames.opening(options.retry_ms, sent.encode(plan.scope))
        cadence = _Beat(options.heartbeat)
        while True:
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                yield frames.comment("token expired; reconnect with a fresh token")
                return
            if cadence.due():
                yield frames.HEARTBEAT
            if not await sub.wait(min(remaining, cadence.left())):
                continue
            if sub.closed:
                yield _ended(sub, options)
                return
            fresh = sub.take()
            owners = plan.owners
            if owners is not None and (missing := owners.unknown(e for e, _data in fresh)):
                learnt: list[None] = []
                learn = partial(owners.learn, channels=missing)
                async for beat in _reading(pool, sub, options.heartbeat, learn, learnt):
                    yield beat
            chunk, sent = _above(plan, sent, fresh)
            del fresh
            if chunk:
                yield chunk
    except _Closed:
        yield _ended(sub, options)
    except DATABASE_TROUBLE as exc:
        log.warning(
            "stream ended: the event log could not be read (%s); the client will resume",
            type(exc).__name__,
        )
        yield frames.closing(options.retry_ms, "event log unavailable")
    finally:
        hub.unsubscribe(sub)


_Replayed = tuple[list[LogEvent], Position]  # a replay page's events, and how far it reached
_Opened = tuple["_Start", "_Replayed | _Recalled"]  # where a stream starts, and its first page


async def _catch_up(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    sub: Subscriber,
    plan: _Plan,
    cursor_text: str | None,
    options: StreamOptions,
    caught_up: list[Position],
) -> AsyncIterator[bytes]:
    """Resolve the cursor and replay the log after it through the head read
    then, leaving in ``caught_up`` where the live tail takes over.

    The stream subscribed before the head was read, so every window after
    the head reaches it live: the replay stops at the head, also after a
    reset (which starts at the head). A resume among the hub's recent events
    replays them from memory instead (no read, no rendering), up to the hub's
    position: every later event reaches the stream live.
    """

    async def opening(conn: psycopg.AsyncConnection[Any]) -> _Opened:
        # The cursor and the first page on one pooled connection (a storm of
        # resuming dashboards queues for the pool half as often).
        start = await _resolve(conn, plan, cursor_text)
        if start.reset is None and plan.owners is None:  # owners are asked of the log
            recalled = hub.recent(plan.channels, start.after)
            if recalled is not None:
                M.replayed.labels("memory").inc(len(recalled[0]))
                return start, recalled
        return start, await _replay_page(conn, plan, start.after, start.head.window)

    opened: list[_Opened] = []
    async for beat in _reading(pool, sub, options.heartbeat, opening, opened):
        yield beat
    start, first_page = opened[0]
    del opened
    sent = start.after
    if start.reset is not None:
        yield frames.reset(options.retry_ms, start.reset, sent.encode(plan.scope))
    else:
        yield frames.opening(options.retry_ms, sent.encode(plan.scope))
    if isinstance(first_page, _Recalled):
        for first in range(0, len(first_page.events), _REPLAY_PAGE):
            part = first_page.events[first : first + _REPLAY_PAGE]
            yield b"".join(plan.render(e, None) for e in part)  # all after the cursor
        caught_up.append(max(sent, first_page.reached))
        return
    events, reached = first_page
    end = start.head.end
    while True:
        chunk, sent = _above(plan, sent, [(e, None) for e in events])
        # Positions are global: past a page that sent nothing, the stream is
        # still complete up to where the page reached.
        sent = max(sent, reached)
        if chunk:
            yield chunk
        if sent >= end:
            caught_up.append(sent)
            return
        paged: list[_Replayed] = []
        next_page = partial(_replay_page, plan=plan, after=sent, through=start.head.window)
        async for beat in _reading(pool, sub, options.heartbeat, next_page, paged):
            yield beat
        events, reached = paged[0]


async def _replay_page(
    conn: psycopg.AsyncConnection[Any], plan: _Plan, after: Position, through: int
) -> _Replayed:
    """The stream's events of the next page after ``after`` (windows up to
    ``through``), with what ``plan.admits`` needs to know, and how far it reached."""
    page = await event_log.read(conn, after, through, selector=plan.selector, limit=_REPLAY_PAGE)
    events = [e for e in page.events if plan.wants(e)]
    M.replayed.labels("log").inc(len(events))
    if plan.owners is not None:
        await plan.owners.learn(conn, plan.owners.unknown(events))
    return events, page.reached


def _above(
    plan: _Plan, sent: Position, events: Sequence[tuple[LogEvent, bytes | None]]
) -> tuple[bytes, Position]:
    """The frames of the events after ``sent``, and the position past them
    (advanced past each, admitted or not). ``events`` are in log order."""
    chunks = []
    if plan.owners is None and not plan.scope:
        if len(plan.channels) == 1 and events and events[0][0].at > sent:
            # One channel holds each event once: all of them are new once the
            # first is (the usual live wake-up), and none needs comparing.
            whole = [f if f is not None else frame(e) for e, f in events]
            return b"".join(whole), events[-1][0].at
        # Several channels (an event may come twice), or a page that begins
        # among events already sent: every event compared, then sent as is.
        for e, shared in events:
            if e.at > sent:
                sent = e.at
                chunks.append(shared if shared is not None else frame(e))
        return b"".join(chunks), sent
    for e, shared in events:
        if e.at > sent:
            sent = e.at
            if plan.admits(e):
                chunks.append(plan.render(e, shared))
    return b"".join(chunks), sent


def _ended(sub: Subscriber, options: StreamOptions) -> bytes:
    if sub.closed == "slow":
        return frames.comment("buffer overflow; resume with Last-Event-ID")
    return frames.closing(options.retry_ms, "relay is shutting down")


async def page(
    pool: AsyncConnectionPool[Any], stream: Stream, after_text: str | None, limit: int
) -> dict[str, Any]:
    """The polling fallback: the same events as the stream, and the cursor to
    pass back for what follows (past pages that held none of them, too)."""
    plan = _plan(stream)
    body: dict[str, Any] = {"events": []}
    events: list[LogEvent] = []
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        start = await _resolve(conn, plan, after_text)
        after = start.after
        if start.reset is not None or not after_text:
            # No cursor, or one we cannot honour: from the oldest retained event,
            # so a client can rebuild its state from this page onwards.
            after = start.head.oldest
            if start.reset is not None:
                body["reset"] = start.reset
        end = start.head.end
        while after < end and len(events) < limit:
            read = await event_log.read(
                conn, after, start.head.window, selector=plan.selector,
                limit=max(limit, _POLL_READ),
            )  # fmt: skip
            events += (e for e in read.events if plan.wants(e))
            after = read.reached
    if len(events) > limit:
        # Every event up to the last one returned, and none after it.
        del events[limit:]
        after = events[-1].at
    body["events"] = [
        {"id": e.at.encode(), "event": e.sse_event, "data": json.loads(e.data)} for e in events
    ]
    body["next"] = after.encode()
    return body
