"""Every read of the gap-free event log: heads, replay, tailing, order
ownership, and retention.

Readers get ``LogEvent`` records holding only what a frame needs (the
event's id, type and restaurant stay unread, as the nil id and the SSE name).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from relay.log.cursor import NIL, Stream
from relay.log.partitions import PARTITIONS, partition_of
from relay.log.records import LogEvent
from relay.sql import query

__all__ = [
    "heads",
    "order_owner",
    "prune",
    "read_partition",
    "replay",
    "replay_customer",
    "replay_global",
    "replay_restaurants",
]


def _event(row: tuple[Any, ...]) -> LogEvent:
    """A frame's worth of a log row; readers of the log need nothing more (the
    event's id, type and restaurant stay unread, as the nil id and the SSE name)."""
    partition, position, sse_event, channels, data = row
    return LogEvent(
        partition=int(partition),
        position=int(position),
        sse_event=sse_event,
        channels=tuple(channels),
        data=data,
        event_id=NIL,
        event_type=sse_event,
        restaurant_id=NIL,
    )


async def heads(conn: psycopg.AsyncConnection[Any]) -> dict[int, tuple[int, int]]:
    """partition -> (last committed position, pruned through)."""
    cur = await conn.execute(query("partition_heads"))
    return {int(p): (int(last), int(pruned)) for p, last, pruned in await cur.fetchall()}


async def read_partition(
    conn: psycopg.AsyncConnection[Any], partition: int, after: int, through: int, limit: int = 5000
) -> list[LogEvent]:
    """Events of one partition with ``after < position <= through``, in order."""
    cur = await conn.execute(
        query("read_partition"),
        {"partition": partition, "after": after, "through": through, "limit": limit},
    )
    return [_event(r) for r in await cur.fetchall()]


async def replay(
    conn: psycopg.AsyncConnection[Any], stream: Stream, after: int, limit: int = 1000
) -> list[LogEvent]:
    """One stream's events after ``after``, in position order, at most ``limit``."""
    name = "replay_channel_order" if stream.kind == "order" else "replay_channel_restaurant"
    key = "order_id" if stream.kind == "order" else "restaurant_id"
    cur = await conn.execute(
        query(name), {key: stream.key, "after": after, "channel": stream.channel, "limit": limit}
    )
    return [_event(r) for r in await cur.fetchall()]


def _vector_param(after: dict[int, int]) -> str:
    """A vector cursor as the queries read it: ``{"partition": position}`` JSON."""
    return json.dumps({str(p): v for p, v in after.items()})


async def replay_global(
    conn: psycopg.AsyncConnection[Any], channel: str, after: dict[int, int], limit: int = 1000
) -> list[LogEvent]:
    """A cross-partition stream's events after a vector cursor, in position order per partition."""
    cur = await conn.execute(
        query("replay_channel_global"),
        {"channel": channel, "after": _vector_param(after), "limit": limit},
    )
    return [_event(r) for r in await cur.fetchall()]


async def replay_restaurants(
    conn: psycopg.AsyncConnection[Any],
    restaurants: Collection[UUID],
    after: dict[int, int],
    limit: int = 1000,
) -> list[LogEvent]:
    """The kitchen events of several restaurants after a vector cursor, in
    position order per partition (so per restaurant), at most ``limit``."""
    ordered = sorted(restaurants)
    cur = await conn.execute(
        query("replay_channel_restaurants"),
        {
            "restaurant_ids": ordered,
            "channels": [f"restaurant:{r}" for r in ordered],
            "after": [after.get(partition_of(r), 0) for r in ordered],
            "limit": limit,
        },
    )
    return [_event(r) for r in await cur.fetchall()]


async def replay_customer(
    conn: psycopg.AsyncConnection[Any], customer: UUID, after: dict[int, int], limit: int = 1000
) -> list[LogEvent]:
    """The order events naming ``customer`` after a vector cursor, in position
    order per partition (whose orders the customer owns, the gateway decides)."""
    cur = await conn.execute(
        query("replay_channel_customer"),
        {"customer_id": customer, "after": _vector_param(after), "limit": limit},
    )
    return [_event(r) for r in await cur.fetchall()]


async def order_owner(
    conn: psycopg.AsyncConnection[Any], order_id: UUID
) -> tuple[UUID, UUID | None] | None:
    """(restaurant_id, customer_id) owning an order, or None if the relay never saw it."""
    cur = await conn.execute(query("order_owner"), {"order_id": order_id})
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


async def prune(
    conn: psycopg.AsyncConnection[Any], retention: timedelta, *, batch: int = 1000
) -> int:
    """Delete expired events in small per-partition transactions; returns how many.

    Each batch is its own short transaction, so retention never holds a lock
    that claiming would wait on for more than a few milliseconds.
    """
    total = 0
    for partition in range(PARTITIONS):
        while True:
            async with conn.transaction():
                cur = await conn.execute(
                    query("prune_partition"),
                    {"partition": partition, "retention": retention, "limit": batch},
                )
                row = await cur.fetchone()
            deleted = int(row[0]) if row else 0
            total += deleted
            if deleted < batch:
                break
    return total
