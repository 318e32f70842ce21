"""Writers that record what they committed, and a log reader that checks it.

The reader follows each partition like a subscriber would (``position >
last read``). Whatever a final full read finds that the incremental reader
never saw was inserted below a position already read: a gap-freedom breach.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from relay.outbox import enqueue
from tests.helpers.orders import CHAIN, event
from tests.helpers.relay_process import RelayProcess


@dataclass
class Ledger:
    committed: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, str]] = field(default_factory=list)
    rolled_back: set[uuid.UUID] = field(default_factory=set)
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
            steps[order] += 1
            if steps[order] == len(CHAIN):
                chains.remove((restaurant, order))


class LogReader:
    """Reads the log incrementally per partition, as a subscriber would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.last: dict[int, int] = defaultdict(int)
        self.seen: list[tuple[int, int, uuid.UUID, uuid.UUID, str]] = []

    def poll(self) -> int:
        got = 0
        with psycopg.connect(self.url) as conn:
            for partition in range(64):
                rows = conn.execute(
                    "SELECT position, event_id, restaurant_id, event_type FROM relay_events"
                    " WHERE partition = %s AND position > %s ORDER BY position",
                    (partition, self.last[partition]),
                ).fetchall()
                for position, event_id, restaurant, kind in rows:
                    self.seen.append((partition, position, event_id, restaurant, kind))
                    self.last[partition] = position
                    got += 1
        return got

    def everything(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(
                "SELECT partition, position, event_id, restaurant_id, event_type FROM relay_events"
                " ORDER BY partition, position"
            ).fetchall()


def check(ledger: Ledger, reader: LogReader) -> list[str]:
    """Every committed event once, none rolled back, causal order, no insertion below a read."""
    problems: list[str] = []
    full = reader.everything()
    seen_ids = [row[2] for row in reader.seen]
    late = {row[2] for row in full} - set(seen_ids)
    if late:
        problems.append(
            f"{len(late)} event(s) appeared below a position already read: {sorted(late)[:3]}"
        )
    dupes = len(seen_ids) - len(set(seen_ids))
    if dupes:
        problems.append(f"{dupes} duplicate event(s) in the log")
    committed = {eid for eid, *_ in ledger.committed}
    missing = committed - set(seen_ids)
    if missing:
        problems.append(f"{len(missing)} committed event(s) never published: {sorted(missing)[:3]}")
    leaked = ledger.rolled_back & set(seen_ids)
    if leaked:
        problems.append(f"{len(leaked)} rolled-back event(s) were published")
    order_of = {eid: (restaurant, order, kind) for eid, restaurant, order, kind in ledger.committed}
    progress: dict[uuid.UUID, int] = defaultdict(int)
    last_position: dict[uuid.UUID, tuple[int, int]] = {}
    for partition, position, eid, restaurant, _kind in reader.seen:
        before = last_position.get(restaurant)
        if before is not None and (partition, position) <= before:
            problems.append(f"restaurant {restaurant}: position {position} after {before}")
        last_position[restaurant] = (partition, position)
        if eid not in order_of:
            continue
        _r, order, kind = order_of[eid]
        expected = CHAIN[progress[order]]
        if kind != expected:
            problems.append(f"order {order}: got {kind} while expecting {expected}")
        progress[order] += 1
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
