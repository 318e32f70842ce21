"""SSE streams and the polling fallback, over the hub and the event log.

Joining a stream without a gap or a duplicate: subscribe to the hub first
(live frames start buffering), then replay the log after the client's cursor,
then drain the buffer skipping every position already sent. The hub delivers
each partition in position order, so "skip positions <= last sent" is an
exact dedupe at the seam between replay and live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from relay import log as event_log
from relay.dispatcher import PARTITIONS, LogEvent, partition_of
from relay.errors import InvalidCursor
from relay.gateway.hub import Hub, Subscriber, frame
from relay.log import (
    GLOBAL,
    Cursor,
    Stream,
    encode_vector,
    parse_vector,
    restaurant_set_scope,
)
from relay.sql import query

__all__ = [
    "DATABASE_TROUBLE",
    "StreamOptions",
    "page",
    "resolve_order",
    "sse_global_stream",
    "sse_restaurants_stream",
    "sse_stream",
    "start_position",
]

# Sent every `heartbeat` seconds by the stream itself (not by a separate ping
# task per connection), also while a database read is slow: proxies keep the
# connection open, a dead client is found by the write, a stuck one by the
# send timeout.
log = logging.getLogger("relay.gateway")

HEARTBEAT = b": heartbeat\n\n"
_REPLAY_PAGE = 1000
_IO_TIMEOUT = 15.0  # a read that takes longer is on a dead connection


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
class Start:
    """Where a stream begins: after ``position``; ``reset`` says why we could not resume."""

    position: int
    head: int
    oldest: int  # positions <= oldest are gone (retention)
    reset: str | None = None


async def start_position(
    pool: AsyncConnectionPool[Any], stream: Stream, cursor_text: str | None
) -> Start:
    """Resolve a client's cursor against the log: resume, or reset with a reason."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        return await _resolve(conn, stream, cursor_text)


async def _opening(
    pool: AsyncConnectionPool[Any], stream: Stream, cursor_text: str | None
) -> tuple[Start, list[LogEvent]]:
    """The cursor resolved and the first replay page, on one pooled connection
    (a storm of resuming dashboards queues for the pool half as often)."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        start = await _resolve(conn, stream, cursor_text)
        if start.reset is not None:
            return start, []
        return start, await event_log.replay(conn, stream, start.position, _REPLAY_PAGE)


async def _resolve(
    conn: psycopg.AsyncConnection[Any], stream: Stream, cursor_text: str | None
) -> Start:
    """Where a cursor resumes in its partition's log, or why it cannot."""
    cur = await conn.execute(query("partition_head"), {"partition": stream.partition})
    row = await cur.fetchone()
    head, pruned = (int(row[0]), int(row[1])) if row else (0, 0)
    if not cursor_text:
        return Start(head, head, pruned)
    try:
        position = stream.start(Cursor.parse(cursor_text))
    except InvalidCursor as exc:
        return Start(head, head, pruned, reset=str(exc))
    if position > head:
        return Start(head, head, pruned, reset="cursor is ahead of the log (another database?)")
    if position < pruned:
        return Start(head, head, pruned, reset="cursor is older than the retention window")
    return Start(position, head, pruned)


async def resolve_order(
    pool: AsyncConnectionPool[Any], order_id: UUID
) -> tuple[UUID, UUID | None] | None:
    """(restaurant_id, customer_id) of an order, or None if the relay never saw it."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        cur = await conn.execute(query("order_owner"), {"order_id": order_id})
        row = await cur.fetchone()
    return (row[0], row[1]) if row else None


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


async def _beating(task: asyncio.Future[Any], every: float) -> AsyncIterator[bytes]:
    """Heartbeats while ``task`` (a database read) runs: a slow database must
    not look like a dead stream to the client or a proxy."""
    try:
        while not task.done():
            done, _pending = await asyncio.wait({task}, timeout=every)
            if not done:
                yield HEARTBEAT
    finally:
        if not task.done():
            task.cancel()


# A log read that failed (pool exhausted, database down, read timed out; psycopg
# wraps socket errors in OperationalError): the stream ends with a retry hint
# and the client resumes by Last-Event-ID; a plain request answers 503.
DATABASE_TROUBLE = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError)


def _unavailable(exc: BaseException, options: StreamOptions) -> bytes:
    log.warning(
        "stream ended: the event log could not be read (%s); the client will resume",
        type(exc).__name__,
    )
    retry = int(options.retry_ms * random.uniform(1.0, 2.0))
    return f"retry: {retry}\n: event log unavailable; reconnect with Last-Event-ID\n\n".encode()


def _reset_frame(reason: str, cursor: str) -> bytes:
    data = json.dumps({"reason": reason, "cursor": cursor}, separators=(",", ":"))
    return f"id: {cursor}\nevent: reset\ndata: {data}\n\n".encode()


async def sse_stream(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    stream: Stream,
    cursor_text: str | None,
    *,
    options: StreamOptions,
    expires_at: datetime,
    subject: str,
) -> AsyncIterator[bytes]:
    """Yield SSE bytes for one subscriber until it is closed, slow, or its token expires."""
    sub = hub.subscribe(stream.channel, stream.partition, options.buffer, subject)
    try:
        live = _joins_live(hub, stream, cursor_text)
        events: list[LogEvent] = []
        if live is not None:
            # Nothing to replay: no query, so a thousand dashboards (re)opening
            # at once cost the pool nothing.
            start = Start(live, live, 0)
        else:
            starting = asyncio.ensure_future(_opening(pool, stream, cursor_text))
            async for beat in _beating(starting, options.heartbeat):
                yield beat
            start, events = starting.result()
        retry = int(options.retry_ms * random.uniform(0.8, 1.2))
        opening = f"retry: {retry}\n"
        sent = start.position
        if start.reset is not None:
            yield opening.encode() + _reset_frame(
                start.reset, Cursor(stream.partition, sent).encode()
            )
        else:
            # An id-only frame gives a fresh client a cursor before any event arrives.
            yield f"{opening}id: {stream.partition}-{sent}\n\n".encode()
            while live is None:  # joined live: everything after `sent` comes from the hub
                if events:
                    yield b"".join(frame(e) for e in events)
                    sent = events[-1].position
                if len(events) < _REPLAY_PAGE:
                    break
                reading = asyncio.ensure_future(_replay_page(pool, stream, sent))
                async for beat in _beating(reading, options.heartbeat):
                    yield beat
                events = reading.result()
        cadence = _Beat(options.heartbeat)
        while True:
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                yield b": token expired; reconnect with a fresh token\n\n"
                return
            if cadence.due():
                yield HEARTBEAT
            if not await sub.wait(min(remaining, cadence.left())):
                continue
            if sub.closed:
                if sub.closed == "slow":
                    yield b": buffer overflow; resume with Last-Event-ID\n\n"
                return
            fresh = [(e.position, data) for e, data in sub.take() if e.position > sent]
            if fresh:
                sent = fresh[-1][0]
                yield b"".join(data for _position, data in fresh)
    except DATABASE_TROUBLE as exc:
        yield _unavailable(exc, options)
    finally:
        hub.unsubscribe(sub)


def _joins_live(hub: Hub, stream: Stream, cursor_text: str | None) -> int | None:
    """The hub's position when the stream can start there with nothing to
    replay: a fresh stream, or a resume from exactly that position (a caught-up
    dashboard reconnecting, e.g. to a restarted relay, on a quiet restaurant)."""
    position = hub.live_position(stream.partition)
    if position is None or not cursor_text:
        return position
    try:
        resumed = stream.start(Cursor.parse(cursor_text))
    except InvalidCursor:
        return None  # the log path answers with a reset and its reason
    return position if resumed == position else None


async def _replay_page(
    pool: AsyncConnectionPool[Any], stream: Stream, after: int
) -> list[LogEvent]:
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        return await event_log.replay(conn, stream, after, _REPLAY_PAGE)


async def page(
    pool: AsyncConnectionPool[Any], stream: Stream, after_text: str | None, limit: int
) -> dict[str, Any]:
    """The polling fallback: the same events as the stream, and the next cursor."""
    start = await start_position(pool, stream, after_text)
    body: dict[str, Any] = {"events": []}
    after = start.position
    if start.reset is not None or not after_text:
        # No cursor, or one we cannot honour: from the oldest retained event,
        # so a client can rebuild its state from this page onwards.
        after = start.oldest
        if start.reset is not None:
            body["reset"] = start.reset
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        events: list[LogEvent] = await event_log.replay(conn, stream, after, limit)
    body["events"] = [
        {"id": f"{e.partition}-{e.position}", "event": e.sse_event, "data": json.loads(e.data)}
        for e in events
    ]
    last = events[-1].position if events else after
    if len(events) < limit:
        # The head was read before the page: every position up to it is in the page.
        last = max(last, start.head)
    body["next"] = Cursor(stream.partition, last).encode()
    return body


def sse_global_stream(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    channel: str,
    cursor_text: str | None,
    *,
    options: StreamOptions,
    expires_at: datetime,
    subject: str,
) -> AsyncIterator[bytes]:
    """A stream spanning every partition (admin, coupon:{id}), resumable by a vector cursor.

    Each frame's id carries the position reached in every partition, so a
    resume is as exact as for a restaurant stream. Such streams are low
    volume by nature (coupons, finance), so the longer id is affordable.
    """

    async def read(conn: psycopg.AsyncConnection[Any], vector: dict[int, int]) -> list[LogEvent]:
        return await event_log.replay_global(conn, channel, vector, _REPLAY_PAGE)

    return _vector_stream(
        lambda: hub.subscribe(channel, GLOBAL, options.buffer, subject),
        hub, pool, cursor_text, _Span("", range(PARTITIONS), read),
        options=options, expires_at=expires_at,
    )  # fmt: skip


def sse_restaurants_stream(
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    restaurants: frozenset[UUID],
    cursor_text: str | None,
    *,
    options: StreamOptions,
    expires_at: datetime,
    subject: str,
) -> AsyncIterator[bytes]:
    """The kitchen streams of several restaurants as one stream (one connection
    for a manager's whole set), resumable by a vector cursor over their partitions.

    Each restaurant's events keep their order (a partition is sent in position
    order); restaurants sharing a partition share its cursor entry, exactly as
    their events share its positions. The cursor names the set, so a cursor of
    another set is reset, not half-honoured.
    """
    ordered = sorted(restaurants)
    routes = [(f"restaurant:{r}", partition_of(r)) for r in ordered]

    async def read(conn: psycopg.AsyncConnection[Any], vector: dict[int, int]) -> list[LogEvent]:
        return await event_log.replay_restaurants(conn, ordered, vector, _REPLAY_PAGE)

    span = _Span(restaurant_set_scope(ordered), sorted({p for _c, p in routes}), read)
    return _vector_stream(
        lambda: hub.subscribe_many(routes, options.buffer, subject),
        hub, pool, cursor_text, span, options=options, expires_at=expires_at,
    )  # fmt: skip


@dataclass(frozen=True)
class _Span:
    """What a vector-cursor stream covers: the scope its cursors carry, the
    partitions its events can be in, and how to read a replay page after a vector."""

    scope: str
    partitions: Sequence[int]
    read: Callable[[psycopg.AsyncConnection[Any], dict[int, int]], Awaitable[list[LogEvent]]]


async def _vector_stream(
    subscribe: Callable[[], Subscriber],
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    cursor_text: str | None,
    span: _Span,
    *,
    options: StreamOptions,
    expires_at: datetime,
) -> AsyncIterator[bytes]:
    """The one tail of every stream resumed by a vector cursor {partition: position}.

    As for one partition: subscribe first, then replay after the cursor, then
    take live frames skipping every position already sent in its partition
    (the hub delivers each partition in position order). Frames carry the
    whole vector as their id.
    """
    sub = subscribe()
    try:
        vector = _vector_joins_live(hub, span, cursor_text)
        reset: str | None = None
        replaying = vector is None  # joined live: everything after `vector` comes from the hub
        if vector is None:
            starting = asyncio.ensure_future(_vector_start(pool, span, cursor_text))
            async for beat in _beating(starting, options.heartbeat):
                yield beat
            vector, reset = starting.result()
        retry = int(options.retry_ms * random.uniform(0.8, 1.2))
        if reset is not None:
            yield f"retry: {retry}\n".encode() + _reset_frame(
                reset, encode_vector(vector, span.scope)
            )
        else:
            yield f"retry: {retry}\nid: {encode_vector(vector, span.scope)}\n\n".encode()
        # Also after a reset or without a cursor: what committed between reading
        # the heads and now is read back, whether or not the hub had loaded them.
        while replaying:
            reading = asyncio.ensure_future(_vector_page(pool, span, dict(vector)))
            async for beat in _beating(reading, options.heartbeat):
                yield beat
            events = reading.result()
            chunks = []
            for e in events:
                vector[e.partition] = e.position
                chunks.append(_vector_frame(e, vector, span.scope))
            if chunks:
                yield b"".join(chunks)
            replaying = len(events) == _REPLAY_PAGE
        cadence = _Beat(options.heartbeat)
        while True:
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            if remaining <= 0:
                yield b": token expired; reconnect with a fresh token\n\n"
                return
            if cadence.due():
                yield HEARTBEAT
            if not await sub.wait(min(remaining, cadence.left())):
                continue
            if sub.closed:
                if sub.closed == "slow":
                    yield b": buffer overflow; resume with Last-Event-ID\n\n"
                return
            chunks = []
            for e, _data in sub.take():
                if e.position > vector.get(e.partition, 0):
                    vector[e.partition] = e.position
                    chunks.append(_vector_frame(e, vector, span.scope))
            if chunks:
                yield b"".join(chunks)
    except DATABASE_TROUBLE as exc:
        yield _unavailable(exc, options)
    finally:
        hub.unsubscribe(sub)


def _vector_joins_live(hub: Hub, span: _Span, cursor_text: str | None) -> dict[int, int] | None:
    """The hub's positions in the span's partitions when the stream can start
    there with nothing to replay (fresh, or resuming from exactly there); the
    vector form of ``_joins_live``."""
    here = [(p, hub.live_position(p)) for p in span.partitions]
    live = {p: pos for p, pos in here if pos is not None}
    if len(live) < len(here):
        return None  # the hub has not loaded the heads yet
    if not cursor_text:
        return live
    try:
        resumed = parse_vector(cursor_text, span.scope)
    except InvalidCursor:
        return None  # the log path answers with a reset and its reason
    same = all(resumed.get(p, 0) == pos for p, pos in live.items())
    return live if same and resumed.keys() <= live.keys() else None


async def _vector_start(
    pool: AsyncConnectionPool[Any], span: _Span, cursor_text: str | None
) -> tuple[dict[int, int], str | None]:
    """(the vector to replay after, the reason for a reset or None)."""
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        heads = await event_log.heads(conn)
    now = {p: heads[p][0] for p in span.partitions if p in heads}
    if not cursor_text:
        return now, None
    try:
        vector = parse_vector(cursor_text, span.scope)
    except InvalidCursor as exc:
        return now, str(exc)
    if not vector.keys() <= now.keys():
        return now, "cursor belongs to another stream"
    if any(pos > now[p] for p, pos in vector.items()):
        return now, "cursor is ahead of the log (another database?)"
    if any(vector.get(p, 0) < heads[p][1] for p in now):
        return now, "cursor is older than the retention window"
    return vector, None


async def _vector_page(
    pool: AsyncConnectionPool[Any], span: _Span, vector: dict[int, int]
) -> list[LogEvent]:
    async with asyncio.timeout(_IO_TIMEOUT), pool.connection() as conn:
        return await span.read(conn, vector)


def _vector_frame(event: LogEvent, vector: dict[int, int], scope: str) -> bytes:
    return (
        f"id: {encode_vector(vector, scope)}\nevent: {event.sse_event}\ndata: {event.data}\n\n"
    ).encode()
