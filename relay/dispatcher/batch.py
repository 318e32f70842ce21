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
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.pq import Escaping, TransactionStatus

from relay.errors import ConfigError, ContractError, clip
from relay.events import render
from relay.events.stored import MAX_REASON, envelope_from_row
from relay.log import BatchResult, LogEvent, notify
from relay.sql import query

__all__ = ["claim_and_publish"]

log = logging.getLogger("relay.dispatcher")


_CLAIM = query("claim")
_PUBLISH = query("publish")
if _PUBLISH.count(b"{plan}") != 1:
    raise RuntimeError("publish must have exactly one {plan} slot")
_PUBLISH_ARRAYS = _PUBLISH.replace(b"{plan}", query("publish_plan_arrays"))
_PUBLISH_JSON = _PUBLISH.replace(b"{plan}", query("publish_plan_json"))
# Up to this many rows a batch publishes and commits in one round trip (its
# plan as one JSON text); larger batches send binary arrays, then COMMIT: a
# round trip costs about as much as encoding and decoding 20 rows as JSON.
_ONE_TRIP_ROWS = 32
# The claim and the JSON publish as named server-side statements: a batch
# calls them in simple queries (BEGIN with the claim; the publish with
# COMMIT), which carry no parameters.
_PREPARE = (
    b"PREPARE relay_claim(integer, integer) AS "
    + _CLAIM.replace(b"%(batch_size)s", b"$1").replace(b"%(backlog_partitions)s", b"$2")
    + b";\nPREPARE relay_publish(text, text) AS "
    + _PUBLISH_JSON.replace(b"%(plan)s", b"$1").replace(b"%(notice)s", b"$2")
)
if b"%(" in _PREPARE:
    raise RuntimeError("claim/publish take only the parameters _PREPARE substitutes")


async def claim_and_publish(
    conn: psycopg.AsyncConnection[Any], *, batch_size: int, backlog_partitions: int = 16
) -> BatchResult:
    """Claim and publish one batch; ``claimed == 0`` when nothing was pending.

    ``conn`` must be in autocommit mode; the batch runs in its own transaction:
    BEGIN with the claim in one round trip, then, up to ``_ONE_TRIP_ROWS``
    rows, the publish with COMMIT in another (larger batches: the publish,
    then COMMIT). Round trips are most of a small batch's cost; psycopg's
    pipeline mode measured no cheaper here.
    """
    started = time.perf_counter()
    try:
        cur = await _begin_and_claim(conn, batch_size, backlog_partitions)
        claimed = await cur.fetchall()
        # A row without an id stands for a stale partition (another replica
        # published it after this claim's snapshot): claim again at once.
        rows = [row for row in claimed if row[1] is not None]
        stale = len(claimed) - len(rows)
        if not rows:
            await conn.execute(b"COMMIT")
            return BatchResult(
                0, (), 0, 0, {}, (), time.perf_counter() - started, more=stale > 0, stale=stale
            )
        plan = _Plan({int(row[2]): int(row[0]) for row in rows})
        # A partition that filled its share probably has more waiting.
        share = int(rows[0][-1])
        more = (
            stale > 0
            or len(rows) >= batch_size
            or max(Counter(r[2] for r in rows).values()) >= share
        )
        for row in rows:
            plan.add(row)
        if len(rows) <= _ONE_TRIP_ROWS:
            cur = await conn.execute(plan.publish_and_commit(conn))
        else:
            cur = await conn.execute(_PUBLISH_ARRAYS, plan.array_params())
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
        stale=stale,
    )


async def _begin_and_claim(
    conn: psycopg.AsyncConnection[Any], batch_size: int, backlog_partitions: int
) -> psycopg.AsyncCursor[Any]:
    """BEGIN and the claim in one round trip: two statements in one simple query.

    A simple query carries no parameters, so the claim and the publish are
    server-side prepared statements (planned once per connection).
    """
    statement = b"BEGIN; EXECUTE relay_claim(%d, %d)" % (int(batch_size), int(backlog_partitions))
    try:
        cur = await conn.execute(statement)
    except psycopg.errors.InvalidSqlStatementName:  # a new connection: prepare once
        await conn.execute(b"ROLLBACK")
        await conn.execute(_PREPARE)
        try:
            cur = await conn.execute(statement)
        except psycopg.errors.InvalidSqlStatementName:
            raise ConfigError(
                "DATABASE_URL: the session forgot relay_claim right after preparing it; "
                "the relay needs a session of its own (a direct connection or a pooler "
                "in session mode, not transaction mode)"
            ) from None
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
        # One (id, partition, position, sse_event, channels, data, reason) per claimed row.
        self.rows: list[
            tuple[int, int, int | None, str | None, str | None, str | None, str | None]
        ] = []
        self.dead = 0
        self.dropped_fields = 0
        self.enqueued_at: list[datetime] = []

    def add(self, row: tuple[Any, ...]) -> None:
        (_last, row_id, partition, event_id, event_type, version, restaurant_id, order_id,
         customer_id, payload_text, occurred, unloadable_time, derived, enqueued,
         _share) = row  # fmt: skip
        try:
            broadcast = render(
                envelope_from_row(
                    event_id,
                    event_type,
                    version,
                    restaurant_id,
                    order_id,
                    customer_id,
                    payload_text,
                    occurred,
                    unloadable_time,
                    derived=derived,
                )
            )
        except ContractError as exc:
            self._dead(row_id, partition, event_id, event_type, version, str(exc))
            return
        except Exception as exc:  # a bug must not lose the event: park it for retry
            log.exception("unexpected error validating event %s", event_id)
            self._dead(
                row_id,
                partition,
                event_id,
                event_type,
                version,
                f"internal error: {type(exc).__name__}: {clip(str(exc), 200)}",
            )
            return
        self.dropped_fields += len(broadcast.dropped_fields)
        position = self.next_position[partition]
        self.next_position[partition] = position + 1
        self.first_position.setdefault(partition, position)
        self.rows.append(
            (
                row_id,
                partition,
                position,
                broadcast.sse_event,
                " ".join(broadcast.channels),
                broadcast.json,
                None,
            )
        )
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

    def _dead(
        self,
        row_id: int,
        partition: int,
        event_id: UUID,
        event_type: str,
        version: int,
        reason: str,
    ) -> None:
        reason = clip(reason, MAX_REASON)
        shown_type = clip(event_type)
        log.warning(
            "dead-lettered event %s (%s v%s): %s", event_id, shown_type, version, reason,
            extra={"event_id": str(event_id), "event_type": shown_type},
        )  # fmt: skip
        self.dead += 1
        self.rows.append((row_id, partition, None, None, None, None, reason))

    def published_heads(self) -> dict[int, tuple[int, int]]:
        return {p: (first, self.next_position[p] - 1) for p, first in self.first_position.items()}

    def notice(self) -> str:
        """What ``NOTIFY relay_events`` tells every relay process of this batch."""
        return notify.encode(self.published_heads())

    def publish_and_commit(self, conn: psycopg.AsyncConnection[Any]) -> bytes:
        """The publish and COMMIT as one simple query (one round trip).

        The plan travels as one JSON text, quoted by libpq's PQescapeLiteral
        (correct whatever the session's string settings), never by hand.
        """
        quote = Escaping(conn.pgconn).escape_literal
        return b"EXECUTE relay_publish(%s, %s); COMMIT" % (
            quote(json.dumps(self.rows, separators=(",", ":")).encode()),
            quote(self.notice().encode()),
        )

    def array_params(self) -> dict[str, Any]:
        columns = (list(column) for column in zip(*self.rows, strict=True))
        ids, partitions, positions, sse_events, channels, data, reasons = columns
        return {
            "ids": ids,
            "partitions": partitions,
            "positions": positions,
            "sse_events": sse_events,
            "channels": channels,
            "data": data,
            "reasons": reasons,
            "notice": self.notice(),
        }
