"""Reading the gap-free event log: cursors, replay, tailing and retention.

A cursor is ``"{partition}-{position}"``: opaque to clients, exact for us. All
events of one stream (a restaurant, an order) live in one partition, whose
positions are committed in increasing order (see ``dispatcher.batch``), so
"everything after position p" is a complete answer at any moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from relay.dispatcher import PARTITIONS, LogEvent, partition_of
from relay.errors import InvalidCursor
from relay.sql import query

__all__ = [
    "Cursor",
    "Stream",
    "heads",
    "prune",
    "read_partition",
    "replay",
]

_CURSOR = re.compile(r"^(\d{1,2})-(\d{1,19})$")


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    partition: int
    position: int

    def encode(self) -> str:
        return f"{self.partition}-{self.position}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _CURSOR.match(text.strip())
        if not match or int(match.group(1)) >= PARTITIONS:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscribable channel and where its events live in the log."""

    channel: str  # "restaurant:<uuid>" or "order:<uuid>"
    partition: int
    key: UUID  # the restaurant or order id the replay query filters on

    @classmethod
    def restaurant(cls, restaurant_id: UUID) -> Stream:
        return cls(f"restaurant:{restaurant_id}", partition_of(restaurant_id), restaurant_id)

    @classmethod
    def order(cls, order_id: UUID, restaurant_id: UUID) -> Stream:
        return cls(f"order:{order_id}", partition_of(restaurant_id), order_id)

    @property
    def kind(self) -> str:
        return self.channel.split(":", 1)[0]

    def start(self, cursor: Cursor) -> int:
        """The position to resume after; InvalidCursor if it belongs elsewhere."""
        if cursor.partition != self.partition:
            raise InvalidCursor("cursor belongs to another stream")
        return cursor.position


def _event(row: tuple[Any, ...]) -> LogEvent:
    partition, position, sse_event, channels, data = row[:5]
    return LogEvent(
        partition=int(partition),
        position=int(position),
        sse_event=sse_event,
        channels=tuple(channels),
        data=data,
        event_id=row[5] if len(row) > 5 else _NIL,
        event_type=row[6] if len(row) > 6 else sse_event,
        restaurant_id=row[7] if len(row) > 7 else _NIL,
    )


_NIL = UUID(int=0)


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
    name = "replay_channel_restaurant" if stream.kind == "restaurant" else "replay_channel_order"
    key = "restaurant_id" if stream.kind == "restaurant" else "order_id"
    cur = await conn.execute(
        query(name), {key: stream.key, "after": after, "channel": stream.channel, "limit": limit}
    )
    return [_event(r) for r in await cur.fetchall()]


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
