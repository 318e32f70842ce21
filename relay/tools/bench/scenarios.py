"""The bench scenarios (SPEC §7): each measures the relay and its ceiling in one run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.log import Position
from relay.recorder import RecorderConfig
from relay.sql import query
from relay.tools.bench import backplane as backplane_reads
from relay.tools.bench import pinned, readpath, snapshot
from relay.tools.bench.env import BackendCpu, Bench, RelayServer, Worker
from relay.tools.bench.peers import PEERS, Peer, payloads
from relay.tools.bench.wal import FOLLOWERS, checkpoint, lsn, wait_caught_up
from relay.tools.bench.wal import wal as wal_per_event

__all__ = ["SCENARIOS", "Sizes"]

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    drain_events: int = 200_000
    restaurants: int = 100
    live_seconds: float = 30.0
    live_rate: float = 1000.0
    fanout_subscribers: int = 1000
    fanout_events: int = 2000
    connections: int = 10_000
    history_events: int = 200_000  # a drain of seconds: 50,000 took ~1.2 s, mostly noise
    history_rows: int = 1_000_000
    replica_events: int = 100_000
    producer_seconds: float = 20.0
    wal_events: int = 20_000
    mode_seconds: float = 10.0
    writers: int = 4
    peer_trial_events: int = 20_000  # at most; each peer sizes its own trials
    read_path_events: int = 50_000
    backplane_events: int = 20_000
    backplane_restaurants: int = 10
    backplane_subscribers: int = 50  # per gateway, spread over the restaurants
    backplane_gateways: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            drain_events=5_000,
            restaurants=20,
            live_seconds=4,
            fanout_subscribers=200,
            fanout_events=200,
            connections=500,
            history_events=3_000,
            history_rows=20_000,
            replica_events=5_000,
            producer_seconds=3,
            wal_events=1_000,
            mode_seconds=3,
            peer_trial_events=500,
            read_path_events=2_000,
            backplane_events=2_000,
            backplane_restaurants=4,
            backplane_subscribers=8,
            # Each run starts its relays (two seconds of imports each): the
            # smoke run keeps the ends, where growth with the count shows.
            backplane_gateways=(1, 4),
        )


def _restaurants(n: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(n)]


def _insert(conn: psycopg.Connection[Any], restaurants: list[uuid.UUID], count: int) -> int:
    """``count`` pending events in statements of 50,000 rows; the WAL they wrote, bytes."""
    before = lsn(conn)
    for start in range(1, count + 1, 50_000):
        last = min(count, start + 49_999)
        conn.execute(
            query("bench_fill_outbox"), {"first": start, "last": last, "restaurants": restaurants}
        )
    return lsn(conn) - before


def _fill(url: str, restaurants: list[uuid.UUID], count: int) -> int:
    """Pending events, vacuumed and checkpointed (no set-up work lands in a
    measured run); returns the WAL bytes of the inserts alone."""
    with psycopg.connect(url, autocommit=True) as conn:
        written = _insert(conn, restaurants, count)
        conn.execute("VACUUM ANALYZE relay_outbox")
        checkpoint(conn)
    return written


def _history(url: str, rows: int) -> Position:
    """``rows`` events of restaurants nobody follows, already published: closed
    into a window of their own with the relay's followers past it, as a relay
    that has been running leaves them. Returns the end of that window."""
    with psycopg.connect(url, autocommit=True) as conn:
        _insert(conn, _restaurants(1000), rows)
        row = conn.execute(query("bench_history_seen"), {"followers": list(FOLLOWERS)}).fetchone()
    assert row is not None
    return Position.end_of(int(row[0]))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# After window 0 (the events retained from before snapshot windows, none in a
# bench database): a stream resuming here replays every event written since.
FROM_START = Position.end_of(0)


def _streams(
    restaurants: list[uuid.UUID], expect: int, *, after: Position | None
) -> list[dict[str, Any]]:
    """Restaurant streams resuming after ``after``, or live (no cursor) when None."""
    cursor = None if after is None else after.encode()
    return [
        {"path": f"/v1/restaurants/{r}/stream", "expect": expect, "cursor": cursor}
        for r in restaurants
    ]


def _subscriber(
    bench: Bench, port: int, ids: list[uuid.UUID], streams: list[dict[str, Any]], **spec: Any
) -> Worker:
    """A subscribe worker (its own process) following ``streams`` on the relay at ``port``."""
    return Worker(
        "subscribe",
        {"host": "127.0.0.1", "port": port, "token": bench.token(ids), "streams": streams, **spec},
    )


class Rate(NamedTuple):
    """A floor's rows/s and what each row cost in CPU, by where it ran."""

    rows: int
    events_per_s: float
    cpu_us: dict[str, float] | None  # None when the server's processes are not visible


def _cpu_us(events: int, **seconds: float | None) -> dict[str, float] | None:
    """CPU µs per event by place (``postgres``, ``relay``, ``clients``…) and their total."""
    if events <= 0 or any(v is None for v in seconds.values()):
        return None
    per = {name: round(1e6 * (v or 0.0) / events, 1) for name, v in seconds.items()}
    return {**per, "total": round(sum(per.values()), 1)}


def _timed_loop(url: str, step: Callable[[psycopg.Connection[Any]], Callable[[], int]]) -> Rate:
    """Run ``step`` until it reads nothing; rows/s and CPU per row (server and this client)."""
    with psycopg.connect(url, autocommit=True) as conn:
        read_rows = step(conn)
        server = BackendCpu(url, every_process=True)
        cpu0, began = time.process_time(), time.monotonic()
        read = 0
        while rows := read_rows():
            read += rows
        elapsed = time.monotonic() - began
        client = time.process_time() - cpu0
        postgres = server.seconds()  # while the session lives: an exited one is not counted
    return Rate(read, read / elapsed, _cpu_us(read, postgres=postgres, client=client))


def ceiling(bench: Bench, events: int, restaurants: int) -> Rate:
    """Bare-SQL claim loop on the same data: rows/s, payload decoded, one connection."""
    with bench.database() as url:
        _fill(url, _restaurants(restaurants), events)
        return _timed_loop(url, _claim_step)


def snapshot_floor(bench: Bench, events: int, restaurants: int) -> Rate:
    """The same data read in place by snapshot windows with nothing else done
    (relay/tools/bench/snapshot.py), the relay's own design bare: rows/s,
    payload decoded, one connection."""
    with bench.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            snapshot.install(conn)
        _fill(url, _restaurants(restaurants), events)
        measured = _timed_loop(url, _window_step)
    if measured.rows != events:
        raise RuntimeError(f"the snapshot-window reader read {measured.rows} of {events} rows")
    return measured


def drain_rate(
    bench: Bench, events: int, restaurants: int, *, relays: int = 1, history_rows: int = 0
) -> dict[str, Any]:
    """Pre-filled outbox → every subscriber has every event of its restaurant, over HTTP.

    Also the WAL of the drain: from the relay's start on the filled (and
    checkpointed) backlog until the relay has recorded every row in a window
    and its followers are past it, against the WAL of the fill's inserts.
    """
    ids = _restaurants(restaurants)
    with bench.database() as url:
        after = _history(url, history_rows) if history_rows else FROM_START
        produced = _fill(url, ids, events)
        with psycopg.connect(url, autocommit=True) as watch:
            wal_before = lsn(watch)
            servers = [RelayServer(bench, url) for _ in range(relays)]
            try:
                started = min(s.wait_ready() for s in servers)
                server_cpu = BackendCpu(url, every_process=True)
                relay_cpu0 = sum(s.cpu_seconds() for s in servers)
                streams = _streams(ids, events // restaurants, after=after)
                # Behind a load balancer: each replica serves its share of the dashboards.
                workers = [
                    _subscriber(bench, server.port, ids, streams[i :: len(servers)], timeout=600)
                    for i, server in enumerate(servers)
                ]
                for worker in workers:
                    worker.wait_ready()
                results = [worker.result() for worker in workers]
                cpu = _cpu_us(
                    events,
                    postgres=server_cpu.seconds(),
                    relay=sum(s.cpu_seconds() for s in servers) - relay_cpu0,
                    clients=sum(float(r["cpu_seconds"]) for r in results),
                )
                wait_caught_up(watch, timeout=120)
                drained = lsn(watch) - wal_before
            finally:
                for server in servers:
                    server.stop()
    elapsed = max(r["finished"] for r in results) - started
    delivered = sum(sum(r["events"]) for r in results)
    return {
        "events": events,
        "delivered": delivered,
        "complete": all(r["complete"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "seconds": round(elapsed, 2),
        "events_per_s": round(delivered / elapsed),
        "cpu_us_per_event": cpu,
        "wal_bytes": drained,  # windows and offsets: a few bytes per event at most
        "wal_bytes_per_event": round(drained / events, 2),
        "producer_wal_bytes_per_event": round(produced / events),
    }


def drain(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """The relay against the ceiling and its design's floor, interleaved
    ``rounds`` times; medians count (one default run measured a floor at
    0.285x of the ceiling, the next at 0.505x)."""
    rounds = 1 if sizes.drain_events < 50_000 else 3
    tops: list[Rate] = []
    windows: list[Rate] = []
    runs: list[dict[str, Any]] = []
    for _ in range(rounds):
        tops.append(ceiling(bench, sizes.drain_events, sizes.restaurants))
        windows.append(snapshot_floor(bench, sizes.drain_events, sizes.restaurants))
        runs.append(drain_rate(bench, sizes.drain_events, sizes.restaurants))
    top, window = _median_rate(tops), _median_rate(windows)
    relay = _median_run(runs)
    return {
        **relay,
        "complete": all(r["complete"] for r in runs),
        "reconnects": sum(r["reconnects"] for r in runs),
        "rounds": rounds,
        "ceiling_events_per_s": round(top.events_per_s),
        "ratio": round(relay["events_per_s"] / top.events_per_s, 3),
        "ratio_per_round": [
            round(r["events_per_s"] / t.events_per_s, 3) for r, t in zip(runs, tops, strict=True)
        ],
        "ceiling_cpu_us_per_event": top.cpu_us,
        # The ratio the relay's CPU per event allows at best: every core busy
        # all the time, nothing waiting. Below a target, no overlap of the
        # work can reach it; only less work per event can.
        "cpu_limit_ratio": _cpu_limit(relay["cpu_us_per_event"], top.events_per_s),
        # The WAL the relay wrote per event, against the producer's inserts:
        # the design reads rows in place, so this is its windows and followers.
        "wal_to_producer": round(
            relay["wal_bytes_per_event"] / max(1, relay["producer_wal_bytes_per_event"]), 3
        ),
        "wal_bytes_per_event_per_round": [r["wal_bytes_per_event"] for r in runs],
        # This design bare (windows read by one statement, nothing else done):
        # its ratio to the ceiling bounds what the relay can reach.
        "snapshot_floor_events_per_s": round(window.events_per_s),
        "snapshot_floor_ratio": round(window.events_per_s / top.events_per_s, 3),
        "snapshot_floor_ratio_per_round": [
            round(w.events_per_s / t.events_per_s, 3) for w, t in zip(windows, tops, strict=True)
        ],
        "snapshot_floor_cpu_us_per_event": window.cpu_us,
        "relay_to_snapshot_floor": round(relay["events_per_s"] / window.events_per_s, 3),
    }


def _median_rate(rates: list[Rate]) -> Rate:
    """The round with the median rate (its CPU figures with it)."""
    return sorted(rates, key=lambda r: r.events_per_s)[len(rates) // 2]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The drain with the median rate (its other figures with it)."""
    return sorted(runs, key=lambda r: float(r["events_per_s"]))[len(runs) // 2]


def _cpu_limit(cpu_us: dict[str, float] | None, ceiling_per_s: float) -> float | None:
    cores = os.cpu_count() or 1
    if not cpu_us or not cpu_us["total"]:
        return None
    return round(cores * 1e6 / cpu_us["total"] / ceiling_per_s, 3)


def notify_floor(bench: Bench, seconds: float, rate: float = 500.0) -> dict[str, float]:
    """Commit → LISTENer woken, on this server now: the latency floor for any wake-up."""
    with bench.database(migrated=False) as url:
        with psycopg.connect(url, autocommit=True) as setup:
            setup.execute("CREATE TABLE bench_floor (seq integer)")
        received: dict[int, float] = {}
        listening = threading.Event()

        def listen() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("LISTEN bench_floor")
                listening.set()
                for note in conn.notifies(timeout=seconds + 3):
                    received[int(note.payload)] = time.monotonic()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        listening.wait(10)
        committed: dict[int, float] = {}
        with psycopg.connect(url, autocommit=True) as conn:
            began = time.monotonic()
            n = 0
            while time.monotonic() - began < seconds:
                # One reading of the clock: read twice, a late second one
                # made the sleep negative and failed the scenario.
                if (wait := began + n / rate - time.monotonic()) > 0:
                    time.sleep(wait)
                # From the statement's start: the durable commit is part of the floor.
                committed[n] = time.monotonic()
                conn.execute(
                    "WITH i AS (INSERT INTO bench_floor VALUES (%s)) "
                    "SELECT pg_notify('bench_floor', %s::text)",
                    (n, n),
                )
                n += 1
        thread.join()
    latencies = [(received[k] - t) * 1000 for k, t in committed.items() if k in received]
    return {
        "p50_ms": round(_percentile(latencies, 0.5), 3),
        "p99_ms": round(_percentile(latencies, 0.99), 3),
    }


def snapshot_floor_latency(bench: Bench, seconds: float, rate: float) -> dict[str, float]:
    """Commit → rows in hand for the snapshot-window reader polling every 0.5 ms:
    the live floor of the relay's design, bare (no validation, no SSE hop)."""
    arrived: dict[int, float] = {}

    def follow(conn: psycopg.Connection[Any]) -> Callable[[], int]:
        reader = snapshot.WindowReader(conn)

        def step() -> int:
            rows = reader.read()
            now = time.monotonic()
            for row in rows:
                arrived[int(row[6]["orderNumber"].split("-")[1])] = now
            return len(rows)

        return step

    def write() -> dict[str, Any]:
        writer = Worker(
            "write",
            {"database_url": url, "restaurants": [str(uuid.uuid4())], "rate": rate,
             "seconds": seconds},
        )  # fmt: skip
        writer.wait_ready()
        written = writer.result()
        time.sleep(0.5)  # the last rows reach the reader
        return written

    with bench.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            snapshot.install(conn)
        written = _beside_session(url, "snapshot-window", follow, write, pause=0.0005, full=1)
    lat = [(arrived[seq] - t) * 1000 for seq, t in written["commits"] if seq in arrived]
    if len(lat) != len(written["commits"]):
        raise RuntimeError(f"the snapshot-window reader saw {len(lat)} of {written['written']}")
    return {
        "p50_ms": round(_percentile(lat, 0.5), 3),
        "p99_ms": round(_percentile(lat, 0.99), 3),
    }


def latency(bench: Bench, seconds: float, rate: float, wakeup: str) -> dict[str, Any]:
    """Writers commit single-row transactions at ``rate``; commit → frame at the client."""
    ids = _restaurants(10)
    with bench.database() as url, RelayServer(bench, url, RELAY_WAKEUP=wakeup) as server:
        server.wait_ready()
        subscriber = _subscriber(
            bench, server.port, ids, _streams(ids, 0, after=None),
            record=True, timeout=seconds + 4, hold=seconds + 3,
        )  # fmt: skip
        subscriber.wait_ready()
        writer = Worker(
            "write",
            {
                "database_url": url,
                "restaurants": [str(r) for r in ids],
                "rate": rate,
                "seconds": seconds,
            },
        )
        writer.wait_ready()
        written = writer.result()
        seen = subscriber.result()
    arrived: dict[int, float] = {}
    for seq, at in seen["numbers"]:
        arrived.setdefault(seq, at)  # the event itself, not a later alert about its order
    lat = [(arrived[seq] - t) * 1000 for seq, t in written["commits"] if seq in arrived]
    return {
        "wakeup": wakeup,
        "rate": rate,
        "events": written["written"],
        "received": len(lat),
        "p50_ms": round(_percentile(lat, 0.5), 3),
        "p95_ms": round(_percentile(lat, 0.95), 3),
        "p99_ms": round(_percentile(lat, 0.99), 3),
        "max_ms": round(max(lat), 3) if lat else None,
    }


def live(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    floor = notify_floor(bench, min(5.0, sizes.live_seconds))
    window = snapshot_floor_latency(bench, min(5.0, sizes.live_seconds), sizes.live_rate)
    result = latency(bench, sizes.live_seconds, sizes.live_rate, "poll")
    return {
        **result,
        "floor_p50_ms": floor["p50_ms"],
        "floor_p99_ms": floor["p99_ms"],
        "ratio_p99": round(result["p99_ms"] / floor["p99_ms"], 2),
        # Commit → rows in hand by a bare window reader (no SSE hop): against the same floor.
        "snapshot_floor_p50_ms": window["p50_ms"],
        "snapshot_floor_p99_ms": window["p99_ms"],
        "snapshot_floor_ratio_p99": round(window["p99_ms"] / floor["p99_ms"], 2),
    }


def _fan(bench: Bench, subscribers: int, events: int, restaurants: int) -> dict[str, Any]:
    ids = _restaurants(restaurants)
    per_stream = events // restaurants
    streams = _streams([ids[i % restaurants] for i in range(subscribers)], per_stream, after=None)
    with bench.database() as url, RelayServer(bench, url) as server:
        server.wait_ready()
        half = (len(streams) + 1) // 2
        workers = [
            _subscriber(bench, server.port, ids, part, timeout=300)
            for part in (streams[:half], streams[half:])
            if part
        ]
        for worker in workers:
            worker.wait_ready()
        cpu = server.cpu_seconds()
        began = time.monotonic()
        _fill(url, ids, events)
        results = [w.result() for w in workers]
        elapsed = max(r["finished"] for r in results) - began
        cpu = server.cpu_seconds() - cpu
    delivered = sum(sum(r["events"]) for r in results)
    return {
        "subscribers": subscribers,
        "restaurants": restaurants,
        "events": events,
        "delivered": delivered,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(delivered / elapsed),
        "server_cpu_percent": round(100 * cpu / elapsed),
    }


def fanout(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    one = _fan(bench, sizes.fanout_subscribers, sizes.fanout_events, 1)
    spread = _fan(
        bench, sizes.fanout_subscribers, sizes.fanout_events * 10, sizes.fanout_subscribers
    )
    return {**one, "spread": spread}


def connections(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Idle subscribers held by one relay, on restaurant streams and on
    multi-restaurant streams (``multi_restaurant``), each in a relay of its own."""
    ids = _restaurants(100)
    streams = _streams([ids[i % 100] for i in range(sizes.connections)], 1, after=None)
    # Each dashboard carries its own restaurant's token, as staff tokens do.
    tokens = {str(r): bench.token([r]) for r in ids}
    for stream in streams:
        stream["token"] = tokens[stream["path"].split("/")[3]]
    return {
        **_held(bench, streams, ids),
        "multi_restaurant": multi_restaurant_connections(bench, sizes.connections),
    }


def multi_restaurant_connections(
    bench: Bench, count: int, *, managers: int = 100, each: int = 10
) -> dict[str, Any]:
    """``count`` idle streams of ``/v1/restaurants/stream``, each covering the
    ``each`` restaurants its token grants: ``managers`` disjoint sets of random
    restaurants, each followed by ``count / managers`` dashboards, as in the
    single-restaurant case."""
    ids = _restaurants(managers * each)
    sets = [ids[m * each : (m + 1) * each] for m in range(managers)]
    tokens = [bench.token(chosen) for chosen in sets]
    streams = [
        {"path": "/v1/restaurants/stream", "expect": each, "token": tokens[i % managers]}
        for i in range(count)
    ]
    return {**_held(bench, streams, ids), "restaurants_per_stream": each}


def _held(
    bench: Bench, streams: list[dict[str, Any]], restaurants: list[uuid.UUID]
) -> dict[str, Any]:
    """``streams`` held idle by one relay (heartbeat 2 s): its RSS per stream,
    then one event per restaurant of ``restaurants``, counted at every stream
    (each expects the events of the restaurants it covers)."""
    count = len(streams)
    with bench.database() as url, RelayServer(bench, url, RELAY_HEARTBEAT_SECONDS="2") as server:
        server.wait_ready()
        time.sleep(1)
        before = server.rss_kb()
        parts = max(1, min(4, count // 500))
        workers = [
            _subscriber(bench, server.port, [], streams[i::parts], hold=7, timeout=120)
            for i in range(parts)
        ]
        for worker in workers:
            worker.wait_ready()
        time.sleep(3)
        after = server.rss_kb()
        began = time.monotonic()
        _fill(url, restaurants, len(restaurants))
        results = [w.result() for w in workers]
    held = sum(r["ok"] for r in results)
    beats = [b for r in results for b in r["heartbeats"]]
    completed = [r["completed"] for r in results]
    delivered = sum(sum(r["events"]) for r in results)
    seconds = max(completed) - began if None not in completed else None
    return {
        "held": held,
        "requested": count,
        "rss_kb_before": before,
        "rss_kb_after": after,
        "rss_kb_per_conn": round((after - before) / max(1, held), 2),
        "heartbeat_healthy": sum(1 for b in beats if b >= 2),
        "heartbeats_median": statistics.median(beats) if beats else 0,
        # One event per restaurant after the RSS reading: every stream gets
        # those of its restaurants, from the moment the events are written.
        "deliveries": delivered,
        "deliveries_expected": sum(int(s["expect"]) for s in streams),
        "delivery_seconds": None if seconds is None else round(seconds, 3),
        "deliveries_per_s": None if not seconds else round(delivered / seconds),
    }


def history(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Drain with little and with much published history (old outbox rows in
    an old window, already seen), interleaved ``rounds`` times; medians count
    (one drain alone moved by ±15 % between runs here)."""
    rounds = 1 if sizes.history_rows < 100_000 else 3
    small: list[float] = []
    big: list[float] = []
    for _ in range(rounds):
        for rows, rates in ((1_000, small), (sizes.history_rows, big)):
            rates.append(
                drain_rate(bench, sizes.history_events, 20, history_rows=rows)["events_per_s"]
            )
    return {
        "small_rows": 1_000,
        "big_rows": sizes.history_rows,
        "rounds": rounds,
        "small_events_per_s": round(statistics.median(small)),
        "big_events_per_s": round(statistics.median(big)),
        "ratio": round(statistics.median(big) / statistics.median(small), 3),
        "ratio_per_round": [round(b / s, 3) for s, b in zip(small, big, strict=True)],
    }


def replicas(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Drain with one and with two relay processes, interleaved ``rounds`` times;
    medians count (one pair alone gave 0.93 to 1.27 on the same code)."""
    rounds = 1 if sizes.replica_events < 50_000 else 3
    one: list[dict[str, Any]] = []
    two: list[dict[str, Any]] = []
    for _ in range(rounds):
        for relays, runs in ((1, one), (2, two)):
            runs.append(drain_rate(bench, sizes.replica_events, sizes.restaurants, relays=relays))
    single, double = _median_run(one), _median_run(two)
    busy = _cores_busy(single)
    return {
        "rounds": rounds,
        "one_events_per_s": single["events_per_s"],
        "two_events_per_s": double["events_per_s"],
        "ratio": round(double["events_per_s"] / single["events_per_s"], 3),
        "ratio_per_round": [
            round(b["events_per_s"] / a["events_per_s"], 3) for a, b in zip(one, two, strict=True)
        ],
        "one_cpu_us_per_event": single["cpu_us_per_event"],
        "two_cpu_us_per_event": double["cpu_us_per_event"],
        # Cores one replica's drain keeps busy (PostgreSQL, relay and clients):
        # a second replica can add at most the idle rest, at the same CPU per event.
        "one_cores_busy": busy,
        "cpu_limit_ratio": None if not busy else round((os.cpu_count() or 1) / busy, 3),
    }


def _cores_busy(drained: dict[str, Any]) -> float | None:
    cpu = drained["cpu_us_per_event"]
    return None if cpu is None else round(cpu["total"] * drained["events_per_s"] / 1e6, 2)


PLAIN_OUTBOX = """
CREATE TABLE bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event_id uuid NOT NULL UNIQUE,
    event_type text NOT NULL, schema_version integer NOT NULL DEFAULT 1,
    restaurant_id uuid NOT NULL, order_id uuid, customer_id uuid, payload jsonb NOT NULL,
    occurred_on_utc timestamptz NOT NULL)
"""


def _write_rate(url: str, table: str, writers: int, seconds: float) -> float:
    ids = [str(uuid.uuid4()) for _ in range(50)]
    workers = [
        Worker(
            "write",
            {
                "database_url": url,
                "restaurants": ids,
                "table": table,
                "seconds": seconds,
                "first": 1 + i * 10_000_000,
            },
        )
        for i in range(writers)
    ]
    for worker in workers:
        worker.wait_ready()
    results = [w.result() for w in workers]
    return float(sum(r["written"] / r["seconds"] for r in results))


def _relay_rate(
    bench: Bench, sizes: Sizes, seconds: float, wakeup: str
) -> tuple[float, float | None]:
    """Producer rows/s with a relay running; and the relay's CPU (process + sessions), cores."""
    with bench.database() as url, RelayServer(bench, url, RELAY_WAKEUP=wakeup) as server:
        server.wait_ready()
        time.sleep(1)  # notify mode installs its trigger on start
        sessions = BackendCpu(url)
        cpu0, began = server.cpu_seconds(), time.monotonic()
        rate = _write_rate(url, "relay_outbox", sizes.writers, seconds)
        elapsed = time.monotonic() - began
        backend = sessions.seconds()
        cores = None if backend is None else (server.cpu_seconds() - cpu0 + backend) / elapsed
    return rate, cores


def _isolated_rate(bench: Bench, sizes: Sizes, seconds: float, *, relay: bool) -> float | None:
    """Producer rows/s with PostgreSQL and the producers on one core and, when
    ``relay``, a relay running on the other (None on a machine of one core)."""
    cpus = pinned.cores()
    if len(cpus) < 2:
        return None
    with bench.database() as url, pinned.pinned(url, cpus[0]) as isolated:
        if not isolated:
            return None
        if not relay:
            return _write_rate(url, "relay_outbox", sizes.writers, seconds)
        with RelayServer(bench, url) as server:
            pinned.move(server.proc.pid, cpus[1])
            server.wait_ready()
            pinned.move(server.proc.pid, cpus[1])  # and the threads it started meanwhile
            return _write_rate(url, "relay_outbox", sizes.writers, seconds)


def _beside_burner(url: str, sizes: Sizes, seconds: float, cores: float) -> float:
    burner = Worker("burn", {"cores": cores, "seconds": seconds + 1})
    burner.wait_ready()
    try:
        return _write_rate(url, "bench_plain", sizes.writers, seconds)
    finally:
        burner.result()


def _beside_session(
    url: str,
    name: str,
    session: Callable[[psycopg.Connection[Any]], Callable[[], int]],
    work: Callable[[], T],
    *,
    pause: float,
    full: int = 500,
) -> T:
    """``work()`` while one other session takes rows, step after step
    (``session`` builds the step on its connection; a step returns the rows it
    took, and one under ``full`` is followed by ``pause``). A session that
    fails fails the figure: measured beside nothing, it would flatter it."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def take() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                step = session(conn)
                while not stop.is_set():
                    if step() < full:
                        stop.wait(pause)
        except BaseException as exc:  # re-raised below, in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        stop.set()
        thread.join()
    if failed:
        raise RuntimeError(f"the {name} session failed: {failed[0]}") from failed[0]
    return result


def _producers_beside(
    url: str,
    sizes: Sizes,
    seconds: float,
    name: str,
    session: Callable[[psycopg.Connection[Any]], Callable[[], int]],
) -> float:
    """Producer rows/s beside ``session``, pausing the recorder's default linger
    after a partial batch."""
    return _beside_session(
        url,
        name,
        session,
        lambda: _write_rate(url, "relay_outbox", sizes.writers, seconds),
        pause=RecorderConfig().linger,
    )


def _claim_step(conn: psycopg.Connection[Any]) -> Callable[[], int]:
    return lambda: len(conn.execute(query("bench_ceiling_claim")).fetchall())


def _window_step(conn: psycopg.Connection[Any]) -> Callable[[], int]:
    reader = snapshot.WindowReader(conn)
    return lambda: len(reader.read())


def _beside_window_reader(bench: Bench, sizes: Sizes, seconds: float) -> float:
    """Producers beside a reader taking their rows in place by snapshot windows
    (no relay): what not moving rows costs them."""
    with bench.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            snapshot.install(conn)
        return _producers_beside(url, sizes, seconds, "snapshot-window", _window_step)


def idle_cost(bench: Bench, seconds: float) -> dict[str, Any]:
    """What a relay costs when nothing happens: its CPU, its sessions' CPU, its transactions/s."""
    with bench.database() as url, RelayServer(bench, url) as server:
        server.wait_ready()
        time.sleep(2)  # past start-up work (first sweep, heartbeats)
        stats = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"
        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(bench.server_url, autocommit=True) as conn:
            tx0 = conn.execute(stats, (name,)).fetchone()[0]  # type: ignore[index]
            sessions = BackendCpu(url)
            cpu0, began = server.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - began
            backend = sessions.seconds()
            cpu = server.cpu_seconds() - cpu0
            time.sleep(1.1)  # sessions report their statistics at most once a second
            conn.execute("SELECT pg_stat_clear_snapshot()")
            tx1 = conn.execute(stats, (name,)).fetchone()[0]  # type: ignore[index]
    return {
        "relay_cpu_percent": round(100 * cpu / elapsed, 2),
        "sessions_cpu_percent": None if backend is None else round(100 * backend / elapsed, 2),
        "transactions_per_s": round((tx1 - tx0) / elapsed, 1),
    }


def producer(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Producer commit rate without the relay, with it installed, running, and beside a burner.

    The machine is noisy: each variant runs ``rounds`` times, interleaved, and
    the median counts. The burner takes as much CPU as the relay did, touching
    no database: if producers lose as much beside it, the relay's cost to them
    is its CPU on a shared machine, not its wake-up or its locks.
    """
    rounds = 2
    seconds = sizes.producer_seconds / rounds
    rates: dict[str, list[float]] = {
        k: []
        for k in (
            "without", "installed", "window", "poll", "notify", "burner",
            "isolated_without", "isolated_with",
        )
    }  # fmt: skip
    relay_cores: list[float] = []
    with bench.database(migrated=False) as plain, bench.database() as installed:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(PLAIN_OUTBOX)
        for _ in range(rounds):
            for url, table in ((plain, "bench_plain"), (installed, "relay_outbox")):
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"TRUNCATE {table}")
            rates["without"].append(_write_rate(plain, "bench_plain", sizes.writers, seconds))
            rates["installed"].append(
                _write_rate(installed, "relay_outbox", sizes.writers, seconds)
            )
            rates["window"].append(_beside_window_reader(bench, sizes, seconds))
            for mode in ("poll", "notify"):
                rate, cores = _relay_rate(bench, sizes, seconds, mode)
                rates[mode].append(rate)
                if mode == "poll" and cores is not None:
                    relay_cores.append(cores)
            if relay_cores:
                with psycopg.connect(plain, autocommit=True) as conn:
                    conn.execute("TRUNCATE bench_plain")
                rates["burner"].append(_beside_burner(plain, sizes, seconds, relay_cores[-1]))
            for relay_on, key in ((False, "isolated_without"), (True, "isolated_with")):
                isolated = _isolated_rate(bench, sizes, seconds, relay=relay_on)
                if isolated is not None:
                    rates[key].append(isolated)
    mid = {k: statistics.median(v) for k, v in rates.items() if v}
    without = mid["without"]
    modes = {
        mode: latency(bench, sizes.mode_seconds, sizes.live_rate, mode)
        for mode in ("poll", "notify")
    }
    cores = statistics.median(relay_cores) if relay_cores else None
    return {
        "writers": sizes.writers,
        "rounds": rounds,
        "without_rows_per_s": round(without),
        "with_rows_per_s": round(mid["poll"]),
        "ratio": round(mid["poll"] / without, 3),
        "installed_rows_per_s": round(mid["installed"]),
        "installed_ratio": round(mid["installed"] / without, 3),
        # Beside a bare reader of their rows by snapshot windows (no relay):
        # the most the relay's design can leave them.
        "snapshot_floor_rows_per_s": round(mid["window"]),
        "snapshot_floor_ratio": round(mid["window"] / without, 3),
        "notify_rows_per_s": round(mid["notify"]),
        "notify_ratio": round(mid["notify"] / without, 3),
        "relay_cpu_cores": None if cores is None else round(cores, 3),
        "relay_cpu_us_per_event": None if cores is None else round(1e6 * cores / mid["poll"], 1),
        "burner_ratio": round(mid["burner"] / without, 3) if "burner" in mid else None,
        # As a sidecar sits: PostgreSQL and the producers on one core, the
        # relay on the other, so the ratio is the database's cost of the relay
        # and not the core it takes (None on one core).
        "isolated_without_rows_per_s": round(mid["isolated_without"])
        if "isolated_without" in mid
        else None,
        "isolated_with_rows_per_s": round(mid["isolated_with"]) if "isolated_with" in mid else None,
        "isolated_ratio": round(mid["isolated_with"] / mid["isolated_without"], 3)
        if "isolated_with" in mid and "isolated_without" in mid
        else None,
        "idle": idle_cost(bench, min(10.0, sizes.producer_seconds)),
        "latency": {m: {k: v for k, v in r.items() if k.endswith("_ms")} for m, r in modes.items()},
    }


def peer_rate(
    bench: Bench, source: str, peer: Peer, settings: dict[str, Any], events: int
) -> dict[str, Any]:
    """``peer`` drains ``events`` jobs, the first events of ``source``'s outbox as
    payloads, in a fresh database: jobs/s from its worker's start until the bench
    sees no job queued or running, and CPU per job (PostgreSQL, the worker)."""
    with bench.database(migrated=False) as url:
        asyncio.run(peer.fill(url, payloads(source, events)))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            checkpoint(conn)
            # The poll walks the queue's partial indexes of waiting jobs: a
            # sequential scan, planned on the full backlog, would read every
            # job done so far on each poll and charge that to the peer.
            conn.execute("SET enable_seqscan = off")
            worker = Worker("peer", {"peer": peer.name, "database_url": url, **settings})
            worker.wait_ready()
            try:
                began = time.monotonic()
                server = BackendCpu(url, every_process=True)
                while conn.execute(query(peer.pending_query)).fetchone()[0]:  # type: ignore[index]
                    if not worker.running():
                        raise RuntimeError(f"the {peer.name} worker exited, its queue not empty")
                    time.sleep(0.02)
                elapsed = time.monotonic() - began
                postgres = server.seconds()  # before the worker's sessions end
            except BaseException:
                with contextlib.suppress(Exception):  # the first failure is the one to report
                    worker.stop()
                raise
            done = worker.stop()
    if done["handled"] != events:
        raise RuntimeError(f"the {peer.name} worker handled {done['handled']} of {events} jobs")
    return {
        "events_per_s": round(events / elapsed),
        "seconds": round(elapsed, 2),
        "cpu_us_per_event": _cpu_us(events, postgres=postgres, worker=done["cpu_seconds"]),
    }


def _best_settings(bench: Bench, source: str, peer: Peer, events: int) -> dict[str, Any]:
    """Each of the peer's candidate settings drains ``events`` jobs; the fastest wins."""
    trials = [
        {"settings": settings, **peer_rate(bench, source, peer, settings, events)}
        for settings in peer.candidates
    ]
    best = max(trials, key=lambda t: float(t["events_per_s"]))
    return {
        "settings": best["settings"],
        "trial_events": events,
        "trials": [{"settings": t["settings"], "events_per_s": t["events_per_s"]} for t in trials],
    }


def _failed(exc: Exception) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def peers(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """The relay's drain to SSE subscribers beside the job queues a user would pick
    instead, each draining the same backlog of the same events on the same server
    with a no-op handler and its best settings (relay/tools/bench/peers.py).

    Short trials pick each peer's settings first; then the relay and the peers
    drain ``drain_events``, one after the other. ``ratio`` is the relay's
    events/s over the peer's. A peer that cannot be installed or fails reports
    its error; the others still run."""
    events = sizes.drain_events
    report: dict[str, Any] = {"events": events}
    with bench.database() as source:
        _fill(source, _restaurants(sizes.restaurants), events)
        chosen: dict[str, dict[str, Any]] = {}
        for name, peer in PEERS.items():
            trial = min(events, peer.trial_events, sizes.peer_trial_events)
            try:
                chosen[name] = _best_settings(bench, source, peer, trial)
            except Exception as exc:  # a missing or broken peer must not lose the others
                report[name] = _failed(exc)
        relay = drain_rate(bench, events, sizes.restaurants)
        report |= {
            "relay_events_per_s": relay["events_per_s"],
            "relay_complete": relay["complete"],
            "relay_cpu_us_per_event": relay["cpu_us_per_event"],
        }
        for name, picked in chosen.items():
            try:
                measured = peer_rate(bench, source, PEERS[name], picked["settings"], events)
            except Exception as exc:
                report[name] = {**_failed(exc), **picked}
                continue
            ratio = round(relay["events_per_s"] / measured["events_per_s"], 3)
            report[name] = {**measured, "ratio": ratio, **picked}
    measured_rates = {
        n: r["events_per_s"] for n, r in report.items() if n in PEERS and "ratio" in r
    }
    if measured_rates:
        best = max(measured_rates, key=measured_rates.__getitem__)
        report["best_peer"] = best
        report["ratio_to_best"] = report[best]["ratio"]
    return report


def wal(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """WAL the relay writes per event against the producer's own (``relay.tools.bench.wal``)."""
    return wal_per_event(bench, sizes.wal_events, sizes.restaurants)


def read_path(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """The relay's reads of the log (fetch, validation, rendering) against a bare
    fetch of the same rows, in the bench's own process (``readpath``)."""
    events = sizes.read_path_events
    with bench.database() as url:
        _fill(url, _restaurants(sizes.restaurants), events)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(query("record_window")).fetchone()
        assert row is not None
        return readpath.measure(url, int(row[0]), rounds=1 if events < 10_000 else 3)


def backplane(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Reads of the log per event with 1, 2 and 4 gateway processes, with the
    NATS backplane and without (``relay.tools.bench.backplane``)."""
    return backplane_reads.measure(
        bench,
        events=sizes.backplane_events,
        restaurants=sizes.backplane_restaurants,
        subscribers=sizes.backplane_subscribers,
        gateways=sizes.backplane_gateways,
    )


SCENARIOS = {
    "drain": drain,
    "live": live,
    "fanout": fanout,
    "connections": connections,
    "history": history,
    "replicas": replicas,
    "producer": producer,
    "wal": wal,
    "peers": peers,
    "read_path": read_path,
    "backplane": backplane,
}
