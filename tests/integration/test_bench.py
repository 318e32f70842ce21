"""`relay bench --quick`: every scenario runs end to end and reports its figures.

Speed is never asserted here (the machine is shared and noisy); the bench's
own ratios are the performance record. What is asserted is that each
scenario measured something real: every event delivered, every connection held.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers.db import with_database

REQUIRED = [
    "drain.events_per_s", "drain.ceiling_events_per_s", "drain.ratio",
    "live.p50_ms", "live.p99_ms", "live.floor_p99_ms", "live.ratio_p99",
    "fanout.deliveries_per_s", "connections.held", "connections.rss_kb_per_conn",
    "history.ratio", "replicas.ratio", "producer.ratio",
    "drain.wal_bytes_per_event", "drain.producer_wal_bytes_per_event",
    "drain.snapshot_floor_ratio", "drain.relay_to_snapshot_floor",
    "live.snapshot_floor_p99_ms", "producer.snapshot_floor_ratio",
    "peers.relay_events_per_s", "peers.ratio_to_best",
    "read_path.relay_us_per_event", "read_path.bare_us_per_event", "read_path.ratio",
]  # fmt: skip
PEER_NAMES = ("pgqueuer", "procrastinate")


def bench(database_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    server = with_database(database_url, "postgres")
    return subprocess.run(
        [sys.executable, "-m", "relay", "bench", *args],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": server},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(560)
def test_quick_bench_runs_every_scenario_and_prints_the_json(database_url: str) -> None:
    result = bench(database_url, "--quick", "--json", timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    figures = report["scenarios"]
    for key in REQUIRED:
        scenario, name = key.split(".")
        assert isinstance(figures[scenario][name], int | float), key
    assert figures["drain"]["complete"] and figures["drain"]["delivered"] == 5000
    # The read path read the whole window (every valid event), and the bare
    # fetch of the same rows cost something and less than the relay's reads.
    read_path = figures["read_path"]
    assert read_path["events"] == 2000
    assert 0 < read_path["ratio"] < 1
    assert figures["live"]["received"] == figures["live"]["events"] > 0
    assert figures["fanout"]["delivered"] == 200 * 200
    connections = figures["connections"]
    assert connections["held"] == 500
    assert connections["heartbeat_healthy"] == 500
    assert connections["deliveries"] == connections["deliveries_expected"] == 500
    # The multi-restaurant stream, 10 restaurants a stream: every stream held,
    # with its memory measured, and one event per restaurant reaching every
    # stream that covers it.
    multi = connections["multi_restaurant"]
    assert multi["held"] == multi["heartbeat_healthy"] == 500
    assert multi["restaurants_per_stream"] == 10
    assert 0 < multi["rss_kb_per_conn"] < 200
    assert multi["deliveries"] == multi["deliveries_expected"] == 500 * 10
    assert multi["delivery_seconds"] > 0
    producer = figures["producer"]
    assert producer["without_rows_per_s"] > 0 and producer["with_rows_per_s"] > 0
    # Pinned (PostgreSQL and producers on one core, the relay on the other)
    # where this machine lets the bench pin its database server.
    if producer["isolated_ratio"] is not None:
        assert producer["isolated_without_rows_per_s"] > 0
        assert producer["isolated_ratio"] == pytest.approx(
            producer["isolated_with_rows_per_s"] / producer["isolated_without_rows_per_s"],
            rel=0.01,
        )
    # The test database is local: the relay's CPU and its sessions' are measured,
    # and the CPU control ran beside the producers.
    assert producer["relay_cpu_cores"] > 0 and producer["burner_ratio"] > 0
    # The drain's CPU budget: every place that worked for it is counted, and
    # the ceiling (one session, one client) costs less per event than the relay.
    drain = figures["drain"]
    spent = drain["cpu_us_per_event"]
    assert spent["postgres"] > 0 and spent["relay"] > 0 and spent["clients"] > 0
    assert spent["total"] == pytest.approx(
        spent["postgres"] + spent["relay"] + spent["clients"], abs=0.2
    )
    for floor in ("ceiling", "snapshot_floor"):
        assert drain[f"{floor}_cpu_us_per_event"]["client"] > 0, floor
    # Its session is counted (in /proc's 10 ms ticks: a quick run's floor may
    # take fewer than one, so 0 is a reading, not a missing figure).
    assert drain["snapshot_floor_cpu_us_per_event"]["postgres"] >= 0
    assert drain["ceiling_cpu_us_per_event"]["total"] < spent["total"]
    assert drain["cpu_limit_ratio"] > 0
    # WAL around the drain (the relay's windows and followers) and around the
    # fill (the producer's inserts): both measured, the ratio theirs.
    assert drain["wal_bytes"] > 0 and drain["producer_wal_bytes_per_event"] > 0
    assert drain["wal_to_producer"] == pytest.approx(
        drain["wal_bytes_per_event"] / drain["producer_wal_bytes_per_event"], rel=0.01, abs=0.001
    )
    assert producer["idle"]["transactions_per_s"] > 0  # the poll probe is counted
    assert set(producer["latency"]) == {"poll", "notify"}
    assert report["machine"]["postgresql"]["fsync"] in ("on", "off")
    # The peers drained the same backlog, each with the settings its trials chose,
    # next to the relay's drain; ratios are relay over peer, from that same run.
    # WAL: the producer's single-row transactions, then the relay's drain of them.
    wal = figures["wal"]
    assert wal["events"] == 1000
    assert wal["producer_wal_bytes_per_event"] > 0 and wal["wal_bytes_per_event"] > 0
    assert wal["relay_to_producer"] == pytest.approx(
        wal["wal_bytes_per_event"] / wal["producer_wal_bytes_per_event"], rel=0.01, abs=0.0002
    )
    peers = figures["peers"]
    assert peers["events"] == 5000 and peers["relay_complete"]
    for name in PEER_NAMES:
        peer = peers[name]
        assert "error" not in peer, peer["error"]
        assert peer["events_per_s"] > 0 and peer["seconds"] > 0
        assert peer["ratio"] == pytest.approx(
            peers["relay_events_per_s"] / peer["events_per_s"], rel=0.01
        )
        assert peer["settings"] in [t["settings"] for t in peer["trials"]]
        assert all(t["events_per_s"] > 0 for t in peer["trials"])
        assert peer["cpu_us_per_event"]["postgres"] > 0 and peer["cpu_us_per_event"]["worker"] > 0
    assert peers["ratio_to_best"] == peers[peers["best_peer"]]["ratio"]
    # The backplane (NATS with JetStream on this machine): each gateway count
    # ran with the backplane and without, every figure measured; without it
    # every gateway read every event from the log, with it the gateways read
    # less of it, by their own count and by PostgreSQL's.
    backplane = figures["backplane"]
    assert backplane["events"] == 2000 and backplane["gateways"] == [1, 4]
    assert backplane["nats"].startswith("nats://")
    for name in ("db_reads_per_event", "db_tuples_per_event", "backplane_events_per_event",
                 "deliveries_per_s", "seconds"):  # fmt: skip
        for mode in ("backplane", "database"):
            assert set(backplane[name][mode]) == {"1", "4"}, (name, mode)
    for count in ("1", "4"):
        for mode in ("backplane", "database"):
            assert backplane["deliveries_per_s"][mode][count] > 0, (mode, count)
            assert backplane["db_tuples_per_event"][mode][count] > 0, (mode, count)
            assert backplane["db_reads_per_event"][mode][count] >= 0, (mode, count)
        assert backplane["db_reads_per_event"]["database"][count] >= int(count)
        assert backplane["backplane_events_per_event"]["backplane"][count] > 0
        assert backplane["backplane_events_per_event"]["database"][count] == 0
    for figure in ("db_reads_per_event", "db_tuples_per_event"):
        assert backplane[figure]["backplane"]["4"] < backplane[figure]["database"]["4"], figure
    # The table's headline: the same reads, in the order of the gateway counts.
    assert backplane["database_reads_per_event"] == [
        backplane["db_reads_per_event"]["database"][count] for count in ("1", "4")
    ]


def test_unknown_scenario_is_refused(database_url: str) -> None:
    result = bench(database_url, "--only", "drain,warp")
    assert result.returncode == 2
    assert "unknown scenario(s) warp" in result.stderr


async def test_bench_subscriber_resumes_by_cursor_when_the_server_ends_a_stream() -> None:
    """A stream the server closes (slow-reader overflow, restart) is resumed with
    Last-Event-ID, as EventSource does: the scenario completes instead of hanging."""
    from relay.tools.bench.workers import subscribe

    asked: list[str | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        cursor = next((x.split(": ", 1)[1] for x in lines if x.startswith("Last-Event-ID")), None)
        asked.append(cursor)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        first = 1 if cursor is None else int(cursor.rsplit(".", 1)[1]) + 1
        writer.write(b"retry: 1000\nid: w7.90.%d\n\n" % (first - 1))
        for n in range(first, min(first + 3, 6)):  # three frames per connection, then hang up
            writer.write(b'id: w7.90.%d\nevent: OrderStatusChanged\ndata: {"n":%d}\n\n' % (n, n))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await subscribe(
            {
                "host": "127.0.0.1",
                "port": port,
                "token": "t",
                "timeout": 10,
                "streams": [{"path": "/v1/restaurants/r/stream", "expect": 5}],
            }
        )
    assert result["complete"] and result["events"] == [5]
    assert asked[:2] == [None, "w7.90.3"]  # resumed after the last whole frame, not from the start
    assert result["reconnects"] >= 1


def test_producers_beside_a_failing_session_fail_with_its_cause(database_url: str) -> None:
    """A design floor's session that dies must fail the figure, naming why:
    producers measured beside nothing would flatter the floor."""
    from relay.tools.bench.scenarios import Sizes, _producers_beside

    def broken(conn: psycopg.Connection[Any]) -> Callable[[], int]:
        return lambda: len(conn.execute("SELECT 1 / 0").fetchall())

    with pytest.raises(RuntimeError, match=r"the test-floor session failed: division by zero"):
        _producers_beside(database_url, Sizes(writers=1), 1.0, "test-floor", broken)


@pytest.mark.timeout(180)
def test_a_peer_that_fails_reports_its_error_and_the_others_still_run(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer whose library is missing (or breaks) is reported in the JSON; the
    relay's drain and the other peers are measured all the same."""
    from relay.tools.bench import scenarios
    from relay.tools.bench.env import Bench
    from relay.tools.bench.peers import PEERS, Peer

    async def missing(url: str, chunks: object) -> None:
        raise ModuleNotFoundError("No module named 'absent_queue'")

    absent = Peer("absent", missing, PEERS["pgqueuer"].run, "-", ({},), trial_events=10)
    monkeypatch.setattr(scenarios, "PEERS", {"absent": absent, "pgqueuer": PEERS["pgqueuer"]})
    sizes = scenarios.Sizes(drain_events=300, restaurants=3, peer_trial_events=100)
    report = scenarios.peers(Bench(with_database(database_url, "postgres")), sizes)
    assert report["absent"] == {"error": "ModuleNotFoundError: No module named 'absent_queue'"}
    assert report["relay_complete"] and report["pgqueuer"]["events_per_s"] > 0
    assert report["best_peer"] == "pgqueuer"


def _children_running_relay(parent: int) -> list[int]:
    """Pids of ``relay run`` processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"-m relay run" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
def test_a_terminated_bench_stops_the_relays_it_started(database_url: str) -> None:
    """SIGTERM to `relay bench` ends its relay (and worker) processes and drops
    its database instead of leaving a relay retrying a vanished server."""
    server = with_database(database_url, "postgres")
    before = _bench_databases(server)
    bench = subprocess.Popen(
        [sys.executable, "-m", "relay", "bench", "--quick", "--only", "drain", "--json"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": server},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        relays: list[int] = []
        while not relays and time.monotonic() < deadline and bench.poll() is None:
            relays = _children_running_relay(bench.pid)
            time.sleep(0.05)
        assert relays, "the bench never started a relay"
        ours = _bench_databases(server) - before
        assert ours, "the bench's database was not found"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 128 + signal.SIGTERM
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if bench.stderr:
            bench.stderr.close()
    assert not [pid for pid in relays if _alive(pid)]
    assert not ours & _bench_databases(server)


def _bench_databases(server: str) -> set[str]:
    with psycopg.connect(server, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'relay\\_bench\\_%'"
        ).fetchall()
    return {name for (name,) in rows}
