"""SSE streams and the polling fallback, over the hub and the event log.

Every stream kind (a restaurant, an order, finance, admin and coupons, a set
of restaurants, a customer's orders) runs the same loop, ``sse``, from a
``_Plan`` that says which channels it listens on, which partitions its
cursor spans and how to read a replay page.

Joining a stream without a gap or a duplicate: subscribe to the hub first
(live frames start buffering), then replay the log after the client's cursor,
then drain the buffer skipping every position already sent in its partition.
The hub delivers each partition in position order, so "skip positions <= last
sent" is an exact dedupe at the seam between replay and live.
"""

from __future__ import annotations

import asyncio
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
from relay.errors import InvalidCursor
from relay.gateway import frames
from relay.gateway.hub import Hub, Subscriber, frame
from relay.log import (
    GLOBAL,
    PARTITIONS,
    Cursor,
    LogEvent,
    Stream,
    customer_scope,
    encode_vector,
    parse_vector,
    partition_of,
    restaurant_set_scope,
)

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
_IO_TIMEOUT = 15.0  # a read that takes longer is on a dead connection
# How often a stream waiting on a database read looks whether it was closed
# (shutdown, overflow): a slow read must not keep a stream past the shutdown grace.
_CLOSED_CHECK = 0.25

# A log read that failed (pool exhausted, database down, read timed out; psycopg
# wraps socket errors in OperationalError): the stream ends with a retry hint
# and the client resumes by Last-Event-ID; a plain request answers 503.
DATABASE_TROUBLE = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError)


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
Vector = dict[int, int]  # partition -> last position sent


async def resolve_order(
    pool: AsyncConnectionPool[Any], order_id: UUID
) -> tuple[UUID, UUID | None] | None:
    """(restaurant_id, customer_id) of an order, or None if the relay never saw it."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        return await event_log.order_owner(conn, order_id)


# -- plans: what each stream kind listens on and reads --------------------------

Read = Callable[[psycopg.AsyncConnection[Any], Vector], Awaitable[list[LogEvent]]]


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
    """One stream kind: its hub routes, the partitions its cursor spans, its
    cursor codec and its replay page.

    A single-partition stream's cursor is ``{partition}-{position}`` and its
    frames are the hub's, shared by every subscriber. A stream spanning
    partitions carries a vector cursor (``v.3-17.12-5``) in each frame's id;
    ``scope`` fingerprints what it covers, so one stream's cursor is reset,
    not half-honoured, by another.
    """

    routes: tuple[tuple[str, int], ...]
    partitions: Sequence[int]
    read: Read
    scope: str = ""
    single: bool = False
    # Decides which events are sent (live and replay); None sends all.
    owners: _Owners | None = None

    def admits(self, event: LogEvent) -> bool:
        return self.owners is None or self.owners.admits(event)

    def cursor(self, vector: Vector) -> str:
        if self.single:
            partition = self.partitions[0]
            return Cursor(partition, vector.get(partition, 0)).encode()
        return encode_vector(vector, self.scope)

    def parse(self, text: str) -> Vector:
        """The positions a cursor resumes after; InvalidCursor if it belongs elsewhere."""
        if self.single:
            cursor = Cursor.parse(text)
            if cursor.partition != self.partitions[0]:
                raise InvalidCursor("cursor belongs to another stream")
            return {cursor.partition: cursor.position}
        vector = parse_vector(text, self.scope)
        if not vector.keys() <= set(self.partitions):
            raise InvalidCursor("cursor belongs to another stream")
        return vector

    def render(self, event: LogEvent, shared: bytes | None, vector: Vector) -> bytes:
        """An event's frame once ``vector`` includes it."""
        if self.single:
            return shared if shared is not None else frame(event)
        return frames.event(encode_vector(vector, self.scope), event.sse_event, event.data)


def _plan(target: Target) -> _Plan:
    """The plan of a stream kind; shared by every stream of the same target
    (plans hold no per-stream state, except a customer's owned orders)."""
    if isinstance(target, CustomerOrders):
        return _customer_plan(target.customer)
    return _shared_plan(target)


@functools.lru_cache(maxsize=16384)
def _shared_plan(target: Stream | RestaurantSet) -> _Plan:
    if isinstance(target, RestaurantSet):
        ordered = sorted(target.restaurants)

        async def read_set(conn: psycopg.AsyncConnection[Any], after: Vector) -> list[LogEvent]:
            return await event_log.replay_restaurants(conn, ordered, after, _REPLAY_PAGE)

        routes = tuple((f"restaurant:{r}", partition_of(r)) for r in ordered)
        return _Plan(
            routes, sorted({p for _c, p in routes}), read_set, scope=restaurant_set_scope(ordered)
        )
    stream = target
    if stream.partition == GLOBAL:

        async def read_global(conn: psycopg.AsyncConnection[Any], after: Vector) -> list[LogEvent]:
            return await event_log.replay_global(conn, stream.channel, after, _REPLAY_PAGE)

        return _Plan(((stream.channel, GLOBAL),), range(PARTITIONS), read_global)

    async def read_one(conn: psycopg.AsyncConnection[Any], after: Vector) -> list[LogEvent]:
        return await event_log.replay(conn, stream, after.get(stream.partition, 0), _REPLAY_PAGE)

    return _Plan(((stream.channel, stream.partition),), (stream.partition,), read_one, single=True)


def _customer_plan(customer: UUID) -> _Plan:
    """A customer's orders: the events routed to ``customer:{id}`` (from every
    partition), of the orders this customer owns."""

    async def read(conn: psycopg.AsyncConnection[Any], after: Vector) -> list[LogEvent]:
        return await event_log.replay_customer(conn, customer, after, _REPLAY_PAGE)

    return _Plan(
        ((f"customer:{customer}", GLOBAL),), range(PARTITIONS), read,
        scope=customer_scope(customer),
        owners=_Owners(customer),
    )  # fmt: skip


# -- the one stream loop --------------------------------------------------------


@dataclass
class _Start:
    """Where a stream begins: after ``vector``; ``reset`` says why it could not resume."""

    vector: Vector
    heads: Vector  # the log's end when the cursor was resolved
    oldest: Vector  # positions <= these are gone (retention)
    reset: str | None = None


async def _resolve(
    conn: psycopg.AsyncConnection[Any], plan: _Plan, cursor_text: str | None
) -> _Start:
    """Where a cursor resumes in the log, or why it cannot."""
    heads = await event_log.heads(conn)
    now = {p: heads[p][0] for p in plan.partitions if p in heads}
    oldest = {p: heads[p][1] for p in plan.partitions if p in heads}
    if not cursor_text:
        return _Start(now, now, oldest)
    try:
        vector = plan.parse(cursor_text)
    except InvalidCursor as exc:
        return _Start(now, now, oldest, str(exc))
    if any(pos > now.get(p, 0) for p, pos in vector.items()):
        return _Start(now, now, oldest, "cursor is ahead of the log (another database?)")
    if any(vector.get(p, 0) < pruned for p, pruned in oldest.items()):
        return _Start(now, now, oldest, "cursor is older than the retention window")
    return _Start(vector, now, oldest)


def _joins_live(hub: Hub, plan: _Plan, cursor_text: str | None) -> Vector | None:
    """The hub's positions when the stream can start there with nothing to
    replay: a fresh stream, or a resume from exactly there (a caught-up
    dashboard reconnecting, e.g. to a restarted relay, on a quiet restaurant)."""
    live: Vector = {}
    for p in plan.partitions:
        position = hub.live_position(p)
        if position is None:
            return None  # the hub has not loaded the heads yet
        live[p] = position
    if not cursor_text:
        return live
    try:
        resumed = plan.parse(cursor_text)
    except InvalidCursor:
        return None  # the log path answers with a reset and its reason
    return live if all(resumed.get(p, 0) == pos for p, pos in live.items()) else None


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
    this frame and keeps only what it needs: the catch-up (cursor, replay
    pages) runs in a generator of its own that is gone once it is done.
    """
    plan = _plan(target)
    del target  # the plan holds an equal one, shared by every stream of the same target
    if len(plan.routes) == 1:
        channel, partition = plan.routes[0]
        sub = hub.subscribe(channel, partition, options.buffer, subject)
    else:
        sub = hub.subscribe_many(plan.routes, options.buffer, subject)
    try:
        sent = _joins_live(hub, plan, cursor_text)
        if sent is None:
            sent = {}
            async for chunk in _catch_up(pool, sub, plan, cursor_text, options, sent):
                yield chunk
        else:
            # Nothing to replay: no query, so a thousand dashboards (re)opening
            # at once cost the pool nothing.
            yield frames.opening(options.retry_ms, plan.cursor(sent))
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
            if chunk := _above(plan, sent, fresh):
                yield chunk
            del fresh
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


async def _catch_up(
    pool: AsyncConnectionPool[Any],
    sub: Subscriber,
    plan: _Plan,
    cursor_text: str | None,
    options: StreamOptions,
    sent: Vector,
) -> AsyncIterator[bytes]:
    """Resolve the cursor and replay the log after it, leaving in ``sent``
    where the live tail takes over."""

    async def opening(conn: psycopg.AsyncConnection[Any]) -> tuple[_Start, list[LogEvent]]:
        # The cursor and the first page on one pooled connection (a storm of
        # resuming dashboards queues for the pool half as often).
        start = await _resolve(conn, plan, cursor_text)
        return start, await _replay_page(conn, plan, start.vector)

    opened: list[tuple[_Start, list[LogEvent]]] = []
    async for beat in _reading(pool, sub, options.heartbeat, opening, opened):
        yield beat
    start, read = opened[0]
    sent.update(start.vector)
    if start.reset is not None:
        yield frames.reset(options.retry_ms, start.reset, plan.cursor(sent))
    else:
        yield frames.opening(options.retry_ms, plan.cursor(sent))
    # Also after a reset: what committed between reading the heads and now is
    # read back, whether or not the hub had loaded it.
    while True:
        if chunk := _above(plan, sent, ((e, None) for e in read)):
            yield chunk
        if len(read) < _REPLAY_PAGE:
            return
        paged: list[list[LogEvent]] = []
        next_page = partial(_replay_page, plan=plan, after=dict(sent))
        async for beat in _reading(pool, sub, options.heartbeat, next_page, paged):
            yield beat
        read = paged[0]


async def _replay_page(
    conn: psycopg.AsyncConnection[Any], plan: _Plan, after: Vector
) -> list[LogEvent]:
    """The next page after ``after``, with what ``plan.admits`` needs to know."""
    read = await plan.read(conn, after)
    if plan.owners is not None:
        await plan.owners.learn(conn, plan.owners.unknown(read))
    return read


def _above(plan: _Plan, sent: Vector, events: Iterable[tuple[LogEvent, bytes | None]]) -> bytes:
    """The frames of the events above ``sent`` (advanced past each, admitted or not)."""
    chunks = []
    if plan.single and plan.owners is None:
        # The fan-out's inner loop (a thousand dashboards of one restaurant):
        # one partition, every event sent, the hub's shared frame as it is.
        partition = plan.partitions[0]
        last = sent.get(partition, 0)
        for e, shared in events:
            if e.position > last:
                last = e.position
                chunks.append(shared if shared is not None else frame(e))
        sent[partition] = last
        return b"".join(chunks)
    for e, shared in events:
        if e.position > sent.get(e.partition, 0):
            sent[e.partition] = e.position
            if plan.admits(e):
                chunks.append(plan.render(e, shared, sent))
    return b"".join(chunks)


def _ended(sub: Subscriber, options: StreamOptions) -> bytes:
    if sub.closed == "slow":
        return frames.comment("buffer overflow; resume with Last-Event-ID")
    return frames.closing(options.retry_ms, "relay is shutting down")


async def page(
    pool: AsyncConnectionPool[Any], stream: Stream, after_text: str | None, limit: int
) -> dict[str, Any]:
    """The polling fallback: the same events as the stream, and the next cursor."""
    plan = _plan(stream)
    partition = stream.partition
    body: dict[str, Any] = {"events": []}
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        start = await _resolve(conn, plan, after_text)
        after = start.vector.get(partition, 0)
        if start.reset is not None or not after_text:
            # No cursor, or one we cannot honour: from the oldest retained event,
            # so a client can rebuild its state from this page onwards.
            after = start.oldest.get(partition, 0)
            if start.reset is not None:
                body["reset"] = start.reset
        events = await event_log.replay(conn, stream, after, limit)
    body["events"] = [
        {"id": f"{e.partition}-{e.position}", "event": e.sse_event, "data": json.loads(e.data)}
        for e in events
    ]
    last = events[-1].position if events else after
    if len(events) < limit:
        # The head was read before the page: every position up to it is in the page.
        last = max(last, start.heads.get(partition, 0))
    body["next"] = Cursor(partition, last).encode()
    return body
