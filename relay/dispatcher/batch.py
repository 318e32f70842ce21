"""Claim a batch from the outbox and publish it into the event log, atomically.

One transaction per batch:
1. lock up to N partitions that have pending rows (``FOR UPDATE SKIP LOCKED``
   on their counter rows), which makes this process their only publisher, and
   read their oldest pending rows (one statement);
2. validate each row against its model: valid rows get the partition's next
   positions in insert order, invalid ones become dead letters;
3. delete the rows from the outbox, append, dead-letter, advance the counters
   and ``NOTIFY`` in one statement;
4. commit, which releases the partition locks.

Why positions are gap-free: a position is assigned only while holding the
partition's row lock, and the lock is released only after the commit is
visible, so positions become visible in increasing order. A reader that has
seen position *p* can never later find a new event at or below *p*. A crash
anywhere rolls the whole batch back: rows return to the outbox, no position is
consumed, nothing is half-published.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg.pq import TransactionStatus

from relay.errors import ContractError
from relay.events import Envelope, render
from relay.sql import query

__all__ = ["BatchResult", "LogEvent", "claim_and_publish"]

log = logging.getLogger("relay.dispatcher")


class LogEvent(NamedTuple):
    """One published event as readers see it: a position and a pre-encoded object.

    A named tuple: immutable, and cheap to build for every event published or read.
    """

    partition: int
    position: int
    sse_event: str
    channels: tuple[str, ...]
    data: str  # the whitelisted JSON object, encoded once
    event_id: UUID
    event_type: str
    restaurant_id: UUID


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    events: tuple[LogEvent, ...]  # in (partition, position) order
    dead_lettered: int
    dropped_fields: int
    heads: dict[int, tuple[int, int]]  # partition -> (first, last) position published
    enqueued_at: tuple[datetime, ...]  # of the published events, for the lag metric
    seconds: float
    more: bool = False  # the batch hit a limit: more rows are probably pending now


_CLAIM = query("claim")
_PUBLISH = query("publish")
# The claim as a named server-side statement, for _begin_and_claim.
_PREPARE_CLAIM = b"PREPARE relay_claim(integer, integer) AS " + _CLAIM.replace(
    b"%(batch_size)s", b"$1"
).replace(b"%(backlog_partitions)s", b"$2")
assert b"%" not in _PREPARE_CLAIM, "the claim takes exactly two parameters"


# Exact numbers: a JSON 42.50 becomes Decimal("42.50"), never a float. One
# decoder for all rows: json.loads(..., parse_float=...) would build one per call.
_decode = json.JSONDecoder(parse_float=Decimal).decode


async def claim_and_publish(
    conn: psycopg.AsyncConnection[Any], *, batch_size: int, backlog_partitions: int = 16
) -> BatchResult:
    """Claim and publish one batch; ``claimed == 0`` when nothing was pending.

    ``conn`` must be in autocommit mode; the batch runs in its own transaction
    in three round trips: BEGIN with the claim, the publish, COMMIT (an empty
    claim: two). Round trips are most of a small batch's cost; psycopg's
    pipeline mode measured no cheaper here and costlier for empty claims.
    """
    started = time.perf_counter()
    try:
        cur = await _begin_and_claim(conn, batch_size, backlog_partitions)
        rows = await cur.fetchall()
        if not rows:
            await conn.execute(b"COMMIT")
            return BatchResult(0, (), 0, 0, {}, (), time.perf_counter() - started)
        plan = _Plan({int(row[2]): int(row[0]) for row in rows})
        # A partition that filled its share probably has more waiting.
        share = int(rows[0][-1])
        more = len(rows) >= batch_size or max(Counter(r[2] for r in rows).values()) >= share
        for row in rows:
            plan.add(row)
        cur = await conn.execute(_PUBLISH, plan.params())
        await conn.execute(b"COMMIT")
    except BaseException:
        await _rollback_quietly(conn)
        raise
    result = await cur.fetchone()
    appended = int(result[0]) if result else 0
    events = plan.events
    if appended != len(events):
        # Duplicates of already-published event ids were dropped by the log's
        # unique key; they must not reach subscribers either.
        events = await _committed_only(conn, events)
    return BatchResult(
        claimed=len(rows),
        events=tuple(events),
        dead_lettered=plan.dead,
        dropped_fields=plan.dropped_fields,
        heads=plan.published_heads(),
        enqueued_at=tuple(plan.enqueued_at),
        seconds=time.perf_counter() - started,
        more=more,
    )


async def _begin_and_claim(
    conn: psycopg.AsyncConnection[Any], batch_size: int, backlog_partitions: int
) -> psycopg.AsyncCursor[Any]:
    """BEGIN and the claim in one round trip: two statements in one simple query.

    A simple query carries no parameters, so the claim is a server-side
    prepared statement (planned once per connection) called with two integers.
    """
    statement = b"BEGIN; EXECUTE relay_claim(%d, %d)" % (int(batch_size), int(backlog_partitions))
    try:
        cur = await conn.execute(statement)
    except psycopg.errors.InvalidSqlStatementName:  # a new connection: prepare once
        await conn.execute(b"ROLLBACK")
        await conn.execute(_PREPARE_CLAIM)
        cur = await conn.execute(statement)
    cur.nextset()  # past BEGIN's result to the claimed rows
    return cur


async def _rollback_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    """End a failed batch; a broken connection is closed by the caller anyway."""
    if conn.closed or conn.broken:
        return
    with contextlib.suppress(psycopg.Error):
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
            await conn.execute(b"ROLLBACK")


async def _committed_only(
    conn: psycopg.AsyncConnection[Any], events: Sequence[LogEvent]
) -> list[LogEvent]:
    cur = await conn.execute(
        "SELECT event_id, partition, position FROM relay_events WHERE event_id = ANY(%s)",
        ([e.event_id for e in events],),
    )
    stored = {(eid, int(p), int(pos)) for eid, p, pos in await cur.fetchall()}
    kept = [e for e in events if (e.event_id, e.partition, e.position) in stored]
    log.info("dropped %d re-inserted duplicate event(s)", len(events) - len(kept))
    return kept


class _Plan:
    """Validates claimed rows and builds the publish statement's arrays."""

    def __init__(self, heads: dict[int, int]) -> None:
        self.next_position = {p: last + 1 for p, last in heads.items()}
        self.first_position: dict[int, int] = {}
        self.events: list[LogEvent] = []
        self.ids: list[int] = []
        self.positions: list[int | None] = []
        self.sse_events: list[str | None] = []
        self.channels: list[str | None] = []
        self.data: list[str | None] = []
        self.reasons: list[str | None] = []
        self.dead = 0
        self.dropped_fields = 0
        self.enqueued_at: list[datetime] = []

    def add(self, row: tuple[Any, ...]) -> None:
        (_last, row_id, partition, event_id, event_type, version, restaurant_id, order_id,
         customer_id, payload_text, occurred, enqueued, _share) = row  # fmt: skip
        self.ids.append(row_id)
        try:
            broadcast = render(
                Envelope(
                    event_id=event_id,
                    event_type=event_type,
                    schema_version=version,
                    restaurant_id=restaurant_id,
                    order_id=order_id,
                    customer_id=customer_id,
                    occurred_on_utc=occurred,
                    payload=_decode(payload_text),
                )
            )
        except ContractError as exc:
            self._dead(event_id, event_type, version, str(exc))
            return
        except Exception as exc:  # a bug must not lose the event: park it for retry
            log.exception("unexpected error validating event %s", event_id)
            self._dead(
                event_id, event_type, version, f"internal error: {type(exc).__name__}: {exc}"
            )
            return
        self.dropped_fields += len(broadcast.dropped_fields)
        position = self.next_position[partition]
        self.next_position[partition] = position + 1
        self.first_position.setdefault(partition, position)
        self.positions.append(position)
        self.sse_events.append(broadcast.sse_event)
        self.channels.append(" ".join(broadcast.channels))
        self.data.append(broadcast.json)
        self.reasons.append(None)
        self.enqueued_at.append(enqueued)
        self.events.append(
            LogEvent(
                partition=partition,
                position=position,
                sse_event=broadcast.sse_event,
                channels=broadcast.channels,
                data=broadcast.json,
                event_id=event_id,
                event_type=event_type,
                restaurant_id=restaurant_id,
            )
        )

    def _dead(self, event_id: UUID, event_type: str, version: int, reason: str) -> None:
        log.warning(
            "dead-lettered event %s (%s v%s): %s", event_id, event_type, version, reason,
            extra={"event_id": str(event_id), "event_type": event_type},
        )  # fmt: skip
        self.dead += 1
        self.positions.append(None)
        self.sse_events.append(None)
        self.channels.append(None)
        self.data.append(None)
        self.reasons.append(reason)

    def published_heads(self) -> dict[int, tuple[int, int]]:
        return {p: (first, self.next_position[p] - 1) for p, first in self.first_position.items()}

    def params(self) -> dict[str, Any]:
        heads = self.published_heads()
        return {
            "ids": self.ids,
            "positions": self.positions,
            "sse_events": self.sse_events,
            "channels": self.channels,
            "data": self.data,
            "reasons": self.reasons,
            "c_partition": list(heads),
            "c_last_position": [last for _first, last in heads.values()],
            "notice": ",".join(f"{p}:{first}:{last}" for p, (first, last) in heads.items()),
        }
