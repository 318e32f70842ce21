"""SPEC §3.1-3.5 under faults: several recorders, kills, lost connections, restarts.

Each replica here is ``relay run --dispatcher-only``: one at a time holds the
recorder's lease and records windows; the others wait to take it over. The
ledger reads the log as a subscriber does and checks it against what the
writers committed.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.relay_process import RelayProcess
from tests.reliability.ledger import Ledger, LogReader, check, write_orders

LEASE = "recording windows"  # a replica's log line when it takes the recorder's lease


def _drain(reader: LogReader, ledger: Ledger, timeout: float = 60) -> None:
    """Follow the log until every committed event is in it."""
    deadline = time.monotonic() + timeout
    want = {eid for eid, *_ in ledger.committed}
    while time.monotonic() < deadline:
        reader.poll()
        if want <= {s.event_id for s in reader.seen}:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"log has {len(reader.seen)} of {len(want)} committed events after {timeout}s"
    )


def _writers(
    url: str, ledger: Ledger, restaurants: list[uuid.UUID], orders: int
) -> list[threading.Thread]:
    threads = [
        threading.Thread(
            target=write_orders, args=(url, ledger, restaurants, orders // 4), kwargs={"seed": i}
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def recorders(database_url: str) -> Iterator[list[RelayProcess]]:
    procs = [
        RelayProcess(database_url, ("--dispatcher-only",), {"RELAY_BATCH_SIZE": "50"})
        for _ in range(3)
    ]
    for p in procs:
        p.start(wait=False)
    yield procs
    for p in procs:
        p.__exit__()


@pytest.mark.parametrize(
    "orders", [500, pytest.param(5000, marks=[pytest.mark.soak, pytest.mark.timeout(900)])]
)
def test_three_recorders_with_one_killed_every_second_lose_and_reorder_nothing(
    database_url: str, recorders: list[RelayProcess], orders: int
) -> None:
    ledger = Ledger()
    reader = LogReader(database_url)
    restaurants = [uuid.uuid4() for _ in range(20)]
    threads = _writers(database_url, ledger, restaurants, orders=orders)  # 4 events per order
    rng = random.Random(7)
    kills = 0
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        victim = rng.choice(recorders)
        victim.kill()
        kills += 1
        victim.start(wait=False)
        reader.poll()
    for t in threads:
        t.join()
    _drain(reader, ledger)
    assert len(ledger.committed) == orders * 4
    assert kills >= 1
    assert check(ledger, reader) == []


def test_a_killed_recorder_is_replaced_within_the_safety_sweep(database_url: str) -> None:
    """Two replicas: one records; SIGKILL it and the other takes the lease at
    its next sweep, so events committed meanwhile wait about a second."""
    env = {"RELAY_SAFETY_SWEEP": "1s"}
    procs = [RelayProcess(database_url, ("--dispatcher-only",), env) for _ in range(2)]
    for p in procs:
        p.start(wait=False)
    try:
        deadline = time.monotonic() + 20
        while not (holders := [p for p in procs if LEASE in p.output()]):
            assert time.monotonic() < deadline, [p.output() for p in procs]
            time.sleep(0.05)
        assert len(holders) == 1, "two replicas took the recorder's lease"
        holder = holders[0]
        standby = next(p for p in procs if p is not holder)
        ledger, reader = Ledger(), LogReader(database_url)
        write_orders(database_url, ledger, [uuid.uuid4()], 2, seed=3)
        _drain(reader, ledger, timeout=20)

        holder.kill()
        killed = time.monotonic()
        write_orders(database_url, ledger, [uuid.uuid4()], 2, seed=4)
        _drain(reader, ledger, timeout=20)
        took = time.monotonic() - killed
        assert LEASE in standby.output()
        assert took < 1.0 + 2.5, f"the standby took {took:.1f} s to record"
        assert check(ledger, reader) == []
    finally:
        for p in procs:
            p.__exit__()


def test_terminated_connections_and_a_restart_lose_nothing(cluster: ThrowawayPostgres) -> None:
    url = cluster.dsn
    ledger = Ledger()
    reader = LogReader(url)
    restaurants = [uuid.uuid4() for _ in range(5)]
    procs = [RelayProcess(url, ("--dispatcher-only",)) for _ in range(2)]
    for p in procs:
        p.start(wait=False)
    try:
        threads = [
            threading.Thread(target=_resilient_writer, args=(url, ledger, restaurants, 60, seed))
            for seed in range(2)
        ]
        for t in threads:
            t.start()
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            relay_connections = (
                " FROM pg_stat_activity WHERE application_name <> 'writer'"
                " AND pid <> pg_backend_pid() AND datname = current_database()"
            )
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*)" + relay_connections).fetchone()
                if row is not None and row[0] >= 4:  # 2 x (recorder, maintenance, SLA)
                    break
                time.sleep(0.1)
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid))" + relay_connections
            ).fetchone()
        assert killed is not None and killed[0] >= 4
        time.sleep(1.0)
        cluster.restart()
        for t in threads:
            t.join(60)
        _drain(reader, ledger)
        assert check(ledger, reader) == []
        # Each outage is said once per session (lost, and unavailable while
        # reconnecting), never once per retry: 2 outages x 3 sessions
        # (recorder, maintenance, SLA) x 2 lines x 2 processes at most.
        outages = sum(
            p.output().count("database unavailable") + p.output().count("connection lost")
            for p in procs
        )
        assert 1 <= outages <= 24, [p.output() for p in procs]
        assert all("Traceback" not in p.output() for p in procs)
    finally:
        for p in procs:
            p.__exit__()


def _resilient_writer(
    url: str, ledger: Ledger, restaurants: list[uuid.UUID], orders: int, seed: int
) -> None:
    """A writer that survives the restart it is subjected to (retries its whole chain step)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            write_orders(url + "?application_name=writer", ledger, restaurants, orders, seed=seed)
            return
        except psycopg.OperationalError:
            time.sleep(0.2)
            orders = 5  # what was committed is in the ledger; add a few more and finish


def test_listener_down_events_still_flow_by_polling(database_url: str) -> None:
    """notify mode with its LISTEN connection killed over and over: the safety sweep delivers."""
    proc = RelayProcess(
        database_url,
        ("--dispatcher-only",),
        {"RELAY_WAKEUP": "notify", "RELAY_SAFETY_SWEEP": "200ms"},
    ).start(wait=False)
    stop = threading.Event()

    def kill_listeners() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'relay listener'"
                )
                time.sleep(0.05)

    killer = threading.Thread(target=kill_listeners)
    try:
        time.sleep(1.5)
        killer.start()
        ledger = Ledger()
        reader = LogReader(database_url)
        write_orders(database_url, ledger, [uuid.uuid4()], 10, seed=1)
        _drain(reader, ledger, timeout=30)
        assert check(ledger, reader) == []
    finally:
        stop.set()
        if killer.is_alive():
            killer.join()
        proc.__exit__()


@pytest.mark.parametrize("mode", ["poll", "notify"])
def test_wakeup_mode_converges_the_trigger(database_url: str, mode: str) -> None:
    proc = RelayProcess(database_url, ("--dispatcher-only",), {"RELAY_WAKEUP": mode}).start(
        wait=False
    )
    try:
        deadline = time.monotonic() + 15
        want = mode == "notify"
        while time.monotonic() < deadline:
            with psycopg.connect(database_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'relay_outbox_notify'"
                ).fetchone()
            if row == (int(want),):
                break
            time.sleep(0.1)
        assert row == (int(want),)
        ledger = Ledger()
        reader = LogReader(database_url)
        write_orders(database_url, ledger, [uuid.uuid4()], 3, seed=2)
        _drain(reader, ledger, timeout=20)
        assert check(ledger, reader) == []
    finally:
        proc.__exit__()


def test_sigterm_exits_zero_promptly(database_url: str) -> None:
    proc = RelayProcess(database_url).start()
    started = time.monotonic()
    assert proc.stop(timeout=10) == 0
    assert time.monotonic() - started < 8
    assert proc.proc is not None
    proc.signal(signal.SIGTERM)
