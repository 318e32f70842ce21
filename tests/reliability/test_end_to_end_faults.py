"""SPEC §3 end to end: writers → several relays → SSE subscribers, under injected faults.

Writers record what they committed; subscribers (real HTTP clients, two per
restaurant, hopping between relay processes and resuming by Last-Event-ID)
record what they received. The checker then proves: every committed event
reached every subscriber of its restaurant exactly once, in order, nothing
rolled back and nothing foreign arrived.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid

import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.reliability.ledger import Ledger, revive, settle, stop_all, write_orders, write_until
from tests.reliability.subscribers import Subscriber, check_deliveries, received_all


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

        def write(seed: int) -> None:
            url = cluster.dsn + "?application_name=writer"
            write_orders(url, ledger, restaurants, 10, seed=seed)

        # Two concurrent writers on few restaurants, replicas killed while they
        # record and read windows: where cross-replica gaps would show.
        write_until(deadline, write)
        stop_faults.set()
        faults.join(30)
        revive(relays)
        settle(lambda: received_all(ledger, subscribers))
    finally:
        stop_all([stop_faults, stop_clients], threads, relays)
    problems = check_deliveries(ledger, subscribers)
    total = sum(len(s.received) for s in subscribers)
    print(
        f"\nledger: events={len(ledger.committed)} rolled_back={len(ledger.rolled_back)} "
        f"faults={len(injected)} ({', '.join(injected)}) deliveries={total} "
        f"reconnects={sum(s.reconnects for s in subscribers)} problems={len(problems)}"
    )
    assert len(ledger.committed) > 100
    assert len(injected) >= 3
    assert problems == []
