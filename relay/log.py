"""Reading the gap-free event log: cursors, replay, tailing and retention.

A cursor is ``"{partition}-{position}"``: opaque to clients, exact for us. All
events of one stream (a restaurant, an order) live in one partition, whose
positions are committed in increasing order (see ``dispatcher.batch``), so
"everything after position p" is a complete answer at any moment.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from relay.dispatcher import PARTITIONS, LogEvent, partition_of
from relay.errors import InvalidCursor
from relay.events import order_channel
from relay.sql import query

__all__ = [
    "GLOBAL",
    "Cursor",
    "Stream",
    "customer_scope",
    "encode_vector",
    "heads",
    "parse_vector",
    "prune",
    "read_partition",
    "replay",
    "replay_customer",
    "replay_global",
    "replay_restaurants",
    "restaurant_set_scope",
]

_NIL = UUID(int=0)
GLOBAL = -1  # Stream.partition of streams that span every partition
_CURSOR = re.compile(r"^(\d{1,2})-(\d{1,19})$")
# "v", then the scope's fingerprint for a stream over a chosen set of
# restaurants, then "{partition}-{position}" entries.
_VECTOR = re.compile(r"^v(~[0-9a-f]{8})?((?:\.\d{1,2}-\d{1,19})*)$")


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


def encode_vector(positions: dict[int, int], scope: str = "") -> str:
    """A cursor for streams spanning partitions: ``v.3-17.12-5`` (zero entries omitted).

    ``scope`` (see ``restaurant_set_scope``) names the set of restaurants a
    multi-restaurant stream covers: ``v~1a2b3c4d.3-17``. A cursor then only
    resumes the stream of that same set.
    """
    prefix = f"v~{scope}" if scope else "v"
    return prefix + "".join(f".{p}-{pos}" for p, pos in sorted(positions.items()) if pos)


def parse_vector(text: str, scope: str = "") -> dict[int, int]:
    """The positions of a vector cursor; InvalidCursor if malformed or of another scope."""
    match = _VECTOR.match(text.strip())
    if not match:
        raise InvalidCursor(f"malformed cursor {text[:40]!r}")
    if (match.group(1) or "~")[1:] != scope:
        raise InvalidCursor("cursor belongs to another stream")
    vector: dict[int, int] = {}
    for part in match.group(2).split(".")[1:]:
        p, pos = part.split("-")
        if int(p) >= PARTITIONS:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        vector[int(p)] = int(pos)
    return vector


def restaurant_set_scope(restaurants: Iterable[UUID]) -> str:
    """A fingerprint of a set of restaurants, for the cursors of its stream.

    Partitions alone cannot tell two sets apart (restaurants share them): a
    cursor of {A, B} offered to the stream of {A, B, C} would silently skip
    C's events up to B's position. With the set in the cursor it is reset.
    """
    joined = ",".join(sorted(str(r) for r in restaurants))
    return hashlib.sha256(joined.encode()).hexdigest()[:8]


def customer_scope(customer: UUID) -> str:
    """The fingerprint in the cursors of one customer's orders stream: another
    stream's vector cursor offered to it is reset, not half-honoured."""
    return hashlib.sha256(f"customer:{customer}".encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscribable channel and where its events live in the log."""

    # "restaurant:<id>", "order:<restaurant>:<order>", "finance:<id>", "coupon:<id>", "admin"
    channel: str
    partition: int  # GLOBAL for streams that span partitions
    key: UUID  # the restaurant or order id the replay query filters on

    @classmethod
    def restaurant(cls, restaurant_id: UUID) -> Stream:
        return cls(f"restaurant:{restaurant_id}", partition_of(restaurant_id), restaurant_id)

    @classmethod
    def order(cls, order_id: UUID, restaurant_id: UUID) -> Stream:
        """The stream of an order owned by ``restaurant_id`` (see ``order_channel``)."""
        return cls(order_channel(restaurant_id, order_id), partition_of(restaurant_id), order_id)

    @classmethod
    def finance(cls, restaurant_id: UUID) -> Stream:
        return cls(f"finance:{restaurant_id}", partition_of(restaurant_id), restaurant_id)

    @classmethod
    def global_(cls, channel: str) -> Stream:
        """``admin`` or ``coupon:<uuid>``: events from every partition."""
        return cls(channel, GLOBAL, _NIL)

    @property
    def kind(self) -> str:
        return self.channel.split(":", 1)[0]

    def start(self, cursor: Cursor) -> int:
        """The position to resume after; InvalidCursor if it belongs elsewhere."""
        if cursor.partition != self.partition:
            raise InvalidCursor("cursor belongs to another stream")
        return cursor.position


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
        event_id=_NIL,
        event_type=sse_event,
        restaurant_id=_NIL,
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


async def replay_global(
    conn: psycopg.AsyncConnection[Any], channel: str, after: dict[int, int], limit: int = 1000
) -> list[LogEvent]:
    """A cross-partition stream's events after a vector cursor, in position order per partition."""
    cur = await conn.execute(
        query("replay_channel_global"),
        {"channel": channel, "after": json.dumps({str(p): v for p, v in after.items()}),
         "limit": limit},
    )  # fmt: skip
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
        {"customer_id": customer, "after": json.dumps({str(p): v for p, v in after.items()}),
         "limit": limit},
    )  # fmt: skip
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
