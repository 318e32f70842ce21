"""SPEC §3 end to end: writers → several relays → SSE subscribers, under injected faults.

Writers record what they committed; subscribers (real HTTP clients, two per
restaurant, hopping between relay processes and resuming by Last-Event-ID)
record what they received. The checker then proves: every committed event
reached every subscriber of its restaurant exactly once, in order, nothing
rolled back and nothing foreign arrived.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

import httpx
import psycopg
import pytest

from relay.errors import InvalidCursor
from relay.gateway.auth import mint_token
from relay.log import Position
from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames
from tests.helpers.sse import from_start
from tests.reliability.ledger import (
    Ledger,
    out_of_commit_order,
    revive,
    settle,
    stop_all,
    write_orders,
)


@dataclass
class Subscriber:
    restaurant: uuid.UUID
    token: str
    rng: random.Random
    received: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # cursor, event id, restaurant
    cursor: str = ""
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self, relays: list[RelayProcess], stop: threading.Event) -> None:
        self.cursor = from_start()  # from the start of the log
        while not stop.is_set():
            relay = self.rng.choice(relays)
            url = f"{relay.url}/v1/restaurants/{self.restaurant}/stream"
            budget = self.rng.randint(20, 400)  # hang up after this many frames
            try:
                with httpx.stream(
                    "GET", url, headers={"Authorization": f"Bearer {self.token}",
                                         "Last-Event-ID": self.cursor},
                    timeout=httpx.Timeout(5.0, read=4.0),
                ) as response:  # fmt: skip
                    if response.status_code != 200:
                        time.sleep(0.2)
                        continue
                    self.reconnects += 1
                    tail = ""
                    for text in response.iter_text():
                        frames, _comments, tail = parse_frames(tail + text)
                        for frame in frames:
                            if frame.event == "reset":
                                self.errors.append(f"reset at {self.cursor}: {frame.data}")
                            elif frame.event is not None:
                                data = json.loads(frame.data)
                                self.received.append(
                                    (frame.id or "", data["eventId"], data["restaurantId"])
                                )
                                budget -= 1
                            if frame.id:
                                self.cursor = frame.id
                        if budget <= 0 or stop.is_set():
                            break
            except (httpx.HTTPError, OSError):
                time.sleep(0.1)


def _check(ledger: Ledger, subscribers: list[Subscriber]) -> list[str]:
    problems: list[str] = []
    by_restaurant: dict[uuid.UUID, list[str]] = defaultdict(list)
    for event_id, restaurant, _order, _kind in ledger.committed:
        by_restaurant[restaurant].append(str(event_id))
    rolled_back = {str(e) for e in ledger.rolled_back}
    for sub in subscribers:
        ids = [eid for _c, eid, _r in sub.received]
        foreign = [r for _c, _e, r in sub.received if r != str(sub.restaurant)]
        if foreign:
            problems.append(f"{sub.restaurant}: received {len(foreign)} foreign event(s)")
        dupes = len(ids) - len(set(ids))
        if dupes:
            problems.append(f"{sub.restaurant}: {dupes} duplicate deliveries")
        missing = set(by_restaurant[sub.restaurant]) - set(ids)
        if missing:
            problems.append(f"{sub.restaurant}: missing {len(missing)}, e.g. {sorted(missing)[:2]}")
        if rolled_back & set(ids):
            problems.append(f"{sub.restaurant}: received rolled-back events")
        positions = [p for c, _e, _r in sub.received if (p := _position(c)) is not None]
        if len(positions) != len(sub.received):
            problems.append(f"{sub.restaurant}: frames without a cursor of the log")
        if any(b <= a for a, b in pairwise(positions)):
            problems.append(f"{sub.restaurant}: positions out of order")
        problems += out_of_commit_order(ledger, [uuid.UUID(e) for e in ids])
        mine, got = set(by_restaurant[sub.restaurant]), set(ids)
        committed_order = [e for e in ids if e in mine]
        expected_order = [e for e in by_restaurant[sub.restaurant] if e in got]
        # Causal chains: per order, the received order must match the commit order.
        if not _chains_agree(ledger, committed_order, expected_order):
            problems.append(f"{sub.restaurant}: an order's events arrived out of causal order")
        problems.extend(sub.errors[:1])
    return problems


def _position(cursor: str) -> Position | None:
    """The log position a frame id names (the id is opaque to clients; this
    test reads it to prove the order)."""
    try:
        return Position.parse(cursor)
    except InvalidCursor:
        return None


def _chains_agree(ledger: Ledger, received: list[str], committed: list[str]) -> bool:
    order_of = {str(e): o for e, _r, o, _k in ledger.committed}
    got: dict[uuid.UUID, list[str]] = defaultdict(list)
    want: dict[uuid.UUID, list[str]] = defaultdict(list)
    for e in received:
        got[order_of[e]].append(e)
    for e in committed:
        want[order_of[e]].append(e)
    return got == want


def _faults(cluster: ThrowawayPostgres, relays: list[RelayProcess], stop: threading.Event,
            log: list[str], rng: random.Random, soak: bool) -> None:  # fmt: skip
    actions = ["kill", "term", "terminate_backends", "restart_db", "kill"]
    step = 0
    while not stop.wait(2.5):
        action = rng.choice(actions) if soak else actions[step % len(actions)]
        step += 1
        victim = rng.choice(relays)
        if action == "kill":
            victim.kill()
            victim.start(wait=False)
        elif action == "term":
            victim.signal(signal.SIGTERM)
            assert victim.proc is not None
            victim.proc.wait(10)
            victim.start(wait=False)
        elif action == "terminate_backends":
            with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    " AND application_name <> 'writer'"
                )
        elif action == "restart_db":
            cluster.restart()
        log.append(action)


@pytest.mark.parametrize(
    "seconds", [15, pytest.param(180, marks=[pytest.mark.soak, pytest.mark.timeout(900)])]
)
def test_every_committed_event_reaches_every_subscriber_once_in_order_under_faults(
    cluster: ThrowawayPostgres, seconds: int
) -> None:
    rng = random.Random(42)
    restaurants = [uuid.uuid4() for _ in range(3)]
    relays = [
        RelayProcess(
            cluster.dsn, env={"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_SHUTDOWN_GRACE": "2s"}
        )
        for _ in range(3)
    ]
    for relay in relays:
        relay.start()
    stop_clients, stop_faults = threading.Event(), threading.Event()
    subscribers = [
        Subscriber(
            r, mint_token(SECRET, subject=f"staff-{i}", restaurant_ids=[r]), random.Random(i)
        )
        for i, r in enumerate(restaurants * 2)
    ]
    threads = [threading.Thread(target=s.run, args=(relays, stop_clients)) for s in subscribers]
    ledger = Ledger()
    injected: list[str] = []
    faults = threading.Thread(
        target=_faults, args=(cluster, relays, stop_faults, injected, rng, seconds > 60)
    )
    try:
        for t in threads:
            t.start()
        faults.start()
        deadline = time.monotonic() + seconds

        def writer(first_seed: int) -> None:
            seed = first_seed
            while time.monotonic() < deadline:
                seed += 2
                try:
                    write_orders(
                        cluster.dsn + "?application_name=writer", ledger, restaurants, 10, seed=seed
                    )
                except psycopg.OperationalError:
                    time.sleep(0.3)  # restarting; an uncertain commit is not in the ledger

        # Two concurrent writers on few restaurants, replicas killed while they
        # record and read windows: where cross-replica gaps would show.
        writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        stop_faults.set()
        faults.join(30)
        revive(relays)
        want = {sub.restaurant: 0 for sub in subscribers}
        for _e, r, _o, _k in ledger.committed:
            want[r] += 1
        settle(
            lambda: all(
                len({e for _c, e, _r in s.received}) >= want[s.restaurant] for s in subscribers
            )
        )
    finally:
        stop_all([stop_faults, stop_clients], threads, relays)
    problems = _check(ledger, subscribers)
    total = sum(len(s.received) for s in subscribers)
    print(
        f"\nledger: events={len(ledger.committed)} rolled_back={len(ledger.rolled_back)} "
        f"faults={len(injected)} ({', '.join(injected)}) deliveries={total} "
        f"reconnects={sum(s.reconnects for s in subscribers)} problems={len(problems)}"
    )
    assert len(ledger.committed) > 100
    assert len(injected) >= 3
    assert problems == []
