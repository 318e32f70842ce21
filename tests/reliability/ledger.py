"""Writers that record what they committed, and a log reader that checks it.

The reader follows the log as a subscriber does: pages of ``relay.log.read``
after the last position it read, through the newest window. A final read of
the same windows from the origin finds what the follower never saw: an event
that appeared at or below a position already read (a gap-freedom breach),
or one whose position changed after it was read.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple, TypeVar

import psycopg

from relay import log as event_log
from relay.db import aconnect
from relay.log import ORIGIN, Position
from relay.outbox import enqueue
from tests.helpers.orders import CHAIN, event
from tests.helpers.relay_process import RelayProcess

T = TypeVar("T")


@dataclass
class Ledger:
    # (event id, restaurant, order, event type), each writer's in its commit order
    committed: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, str]] = field(default_factory=list)
    rolled_back: set[uuid.UUID] = field(default_factory=set)
    # event id -> the writing thread: one thread commits strictly one after another
    writer_of: dict[uuid.UUID, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_orders(
    url: str,
    ledger: Ledger,
    restaurants: list[uuid.UUID],
    orders: int,
    *,
    seed: int,
    rollback_every: int = 17,
) -> None:
    """Commit causal chains (one transaction per step); every Nth transaction rolls back."""
    rng = random.Random(seed)
    chains = [(rng.choice(restaurants), uuid.uuid4()) for _ in range(orders)]
    steps = {order: 0 for _, order in chains}
    writer = threading.get_ident()
    with psycopg.connect(url) as conn:
        count = 0
        while chains:
            restaurant, order = rng.choice(chains)
            kind = CHAIN[steps[order]]
            item = event(kind, restaurant_id=restaurant, order_id=order)
            count += 1
            enqueue(conn, item)
            if count % rollback_every == 0:
                conn.rollback()
                with ledger.lock:
                    ledger.rolled_back.add(item.event_id)
                continue
            conn.commit()
            with ledger.lock:
                ledger.committed.append((item.event_id, restaurant, order, kind))
                ledger.writer_of[item.event_id] = writer
            steps[order] += 1
            if steps[order] == len(CHAIN):
                chains.remove((restaurant, order))


def write_until(deadline: float, write: Callable[[int], object], *, writers: int = 2) -> None:
    """``writers`` threads call ``write(seed)`` with fresh seeds until
    ``deadline`` (monotonic); returns when all have stopped. A commit cut by
    a fault is uncertain and not in the ledger: the writer waits and goes on."""

    def keep_writing(seed: int) -> None:
        while time.monotonic() < deadline:
            seed += writers
            try:
                write(seed)
            except psycopg.OperationalError:
                time.sleep(0.3)

    threads = [threading.Thread(target=keep_writing, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code (on a thread of its own,
    so a caller inside an event loop works too)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Seen(NamedTuple):
    at: Position
    event_id: uuid.UUID
    restaurant_id: uuid.UUID
    event_type: str


async def _connect(url: str) -> psycopg.AsyncConnection[Any]:
    # Set up as the relay's own sessions are (UTC), named so fault injectors can spare it.
    return await aconnect(url, autocommit=True, role="ledger reader")


async def _read(
    conn: psycopg.AsyncConnection[Any], after: Position, through: int
) -> tuple[list[Seen], list[event_log.Rejected], Position]:
    """Every row after ``after`` through window ``through``, as a subscriber pages it."""
    seen: list[Seen] = []
    rejected: list[event_log.Rejected] = []
    end = Position.end_of(through)
    while after < end:
        page = await event_log.read(conn, after, through, limit=500)
        seen += [
            Seen(e.at, uuid.UUID(e.event_id), uuid.UUID(e.restaurant_id), e.event_type)
            for e in page.events
        ]
        rejected += page.rejected
        assert page.reached > after or page.reached == end, (after, page.reached)
        after = page.reached
    return seen, rejected, after


class LogReader:
    """Reads the log incrementally after the last position read, as a subscriber would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.at = ORIGIN
        self.seen: list[Seen] = []
        self.rejected: list[event_log.Rejected] = []

    def poll(self) -> int:
        return blocking(self._poll())

    async def _poll(self) -> int:
        conn = await _connect(self.url)
        try:
            head = await event_log.head(conn)
            seen, rejected, self.at = await _read(conn, self.at, head.window)
        finally:
            await conn.close()
        self.seen += seen
        self.rejected += rejected
        return len(seen)

    def everything(self) -> list[Seen]:
        """The windows the reader has followed, read again from the origin."""
        return blocking(self._everything())

    async def _everything(self) -> list[Seen]:
        conn = await _connect(self.url)
        try:
            seen, _rejected, _at = await _read(conn, ORIGIN, self.at.window)
        finally:
            await conn.close()
        return seen


def check(ledger: Ledger, reader: LogReader) -> list[str]:
    """Every committed event once, none rolled back, each producer's commit
    order and each order's causal chain kept, nothing inserted at or below a
    position already read."""
    problems: list[str] = []
    full = {s.event_id: s.at for s in reader.everything()}
    read_at = {s.event_id: s.at for s in reader.seen}
    late = set(full) - set(read_at)
    if late:
        problems.append(
            f"{len(late)} event(s) appeared at or below a position already read: "
            f"{sorted((full[e], e) for e in late)[:3]}"
        )
    moved = [e for e, at in read_at.items() if e in full and full[e] != at]
    if moved:
        problems.append(f"{len(moved)} event(s) changed position after being read: {moved[:3]}")
    seen_ids = [s.event_id for s in reader.seen]
    dupes = len(seen_ids) - len(set(seen_ids))
    if dupes:
        problems.append(f"{dupes} duplicate event(s) in the log")
    if reader.rejected:
        problems.append(f"{len(reader.rejected)} row(s) rejected: {reader.rejected[:2]}")
    committed = {eid for eid, *_ in ledger.committed}
    missing = committed - set(seen_ids)
    if missing:
        problems.append(
            f"{len(missing)} committed event(s) never in the log: {sorted(missing)[:3]}"
        )
    leaked = ledger.rolled_back & set(seen_ids)
    if leaked:
        problems.append(f"{len(leaked)} rolled-back event(s) in the log")
    for before, after in pairwise(reader.seen):
        if after.at <= before.at:
            problems.append(f"position {after.at} read after {before.at}")
            break
    problems += out_of_commit_order(ledger, seen_ids)
    order_of = {eid: (order, kind) for eid, _restaurant, order, kind in ledger.committed}
    progress: dict[uuid.UUID, int] = defaultdict(int)
    for s in reader.seen:
        if s.event_id not in order_of:
            continue
        order, kind = order_of[s.event_id]
        expected = CHAIN[progress[order]] if progress[order] < len(CHAIN) else "nothing more"
        if kind != expected:
            problems.append(f"order {order}: got {kind} while expecting {expected}")
        progress[order] += 1
    return problems


def out_of_commit_order(ledger: Ledger, received: Sequence[uuid.UUID]) -> list[str]:
    """One producer's events (so each restaurant's) must arrive in the order
    it committed them: a transaction that starts after another committed is
    at a later position. ``received``: event ids in the order read."""
    rank = {eid: i for i, (eid, *_rest) in enumerate(ledger.committed)}
    last: dict[int, tuple[int, uuid.UUID]] = {}
    problems: list[str] = []
    for eid in received:
        if eid not in rank:
            continue
        writer = ledger.writer_of[eid]
        before = last.get(writer)
        if before is not None and before[0] > rank[eid]:
            problems.append(f"{eid} arrived after {before[1]}, which was committed after it")
        last[writer] = (rank[eid], eid)
    return problems


def revive(relays: Sequence[RelayProcess]) -> None:
    """Start again every replica the fault injector left dead."""
    for relay in relays:
        if relay.proc is not None and relay.proc.poll() is not None:
            relay.start(wait=False)


def settle(done: Callable[[], bool], *, within: float = 60.0) -> None:
    """Wait until ``done()`` (at most ``within`` seconds), then one second more:
    a late duplicate would arrive then."""
    until = time.monotonic() + within
    while time.monotonic() < until and not done():
        time.sleep(0.2)
    time.sleep(1.0)


def stop_all(
    stops: Sequence[threading.Event],
    threads: Sequence[threading.Thread],
    relays: Sequence[RelayProcess],
) -> None:
    """End a fault run: stop the loops, join their threads, stop every replica."""
    for stop in stops:
        stop.set()
    for thread in threads:
        thread.join(15)
    for relay in relays:
        relay.__exit__()
