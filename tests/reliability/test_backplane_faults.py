"""The live backplane under faults: NATS JetStream between one dispatcher and three gateways.

With ``RELAY_BACKPLANE`` the gateways take their live tail from JetStream,
so a lost NATS, a dead gateway or a dead publisher must cost reads of the log
(PostgreSQL), never an event and never an order. Writers record what they
committed; subscribers hop between the three gateway-only replicas and resume
by Last-Event-ID; the check proves every committed event reached every
subscriber of its restaurant exactly once, in order. The metrics then prove
the backplane, not the database, carried the tail.

The smaller tests pin down what an operator sees and what the database
carries while NATS is down and after it is back: ``/readyz``, ``relay
status`` and the gateway's LISTEN session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.nats_server import NatsServer, nats_server
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.reliability.ledger import (
    Ledger,
    revive,
    settle,
    stop_all,
    write_orders,
    write_until,
)
from tests.reliability.subscribers import Subscriber, check_deliveries, received_all

RECEIVED = "relay_backplane_received_events_total"
READ_BACK = "relay_hub_read_back_events_total"

# Heartbeats of SSE comments every second keep a quiet stream within the
# subscribers' read timeout; a short grace keeps restarts quick.
_ENV = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_SHUTDOWN_GRACE": "2s"}
# `relay status` shows roles from the replicas' heartbeats, every 5 s
# (relay/maintenance.py): two of them and a margin.
_STATUS_WITHIN = 15.0
_WRITER_APP = "writer"


# -- helpers -------------------------------------------------------------------


def _dispatcher(database_url: str, server: NatsServer, replica_id: str) -> RelayProcess:
    env = {**_ENV, "RELAY_BACKPLANE": server.url, "RELAY_REPLICA_ID": replica_id}
    return RelayProcess(database_url, ("--dispatcher-only",), env)


def _gateway(database_url: str, server: NatsServer, replica_id: str) -> RelayProcess:
    env = {**_ENV, "RELAY_BACKPLANE": server.url, "RELAY_REPLICA_ID": replica_id}
    return RelayProcess(database_url, ("--gateway-only",), env)


@contextmanager
def _running(relays: Sequence[RelayProcess]) -> Iterator[None]:
    """Start every replica (gateways ready, dispatchers started) and kill them
    all after; on a failure the end of each one's log is printed, since the
    logs go with the replicas."""
    try:
        for relay in relays:
            relay.start()
        yield
    except BaseException:
        for relay in relays:
            name = relay.env.get("RELAY_REPLICA_ID", relay.url)
            print(f"--- {name} {' '.join(relay.args)}: end of its log ---")
            print(relay.output()[-6000:])
        raise
    finally:
        for relay in relays:
            relay.__exit__()


def _wait_for(done: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``done`` until true; the seconds it took, or AssertionError naming ``what``."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def _metric(relay: RelayProcess, name: str) -> float:
    """An unlabelled sample from the replica's /metrics."""
    text = httpx.get(f"{relay.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on {relay.url}/metrics")


def _readyz(relay: RelayProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{relay.url}/readyz", timeout=5)
    return response.status_code, response.json()


def _tail(relay: RelayProcess) -> str | None:
    """Where the gateway takes its live tail from now, as /readyz says (None: unreachable)."""
    try:
        _status, body = _readyz(relay)
    except httpx.HTTPError:
        return None
    backplane = body["checks"].get("backplane") or {}
    tail = backplane.get("tail")
    return tail if isinstance(tail, str) else None


def _on_backplane(gateways: Sequence[RelayProcess], within: float) -> None:
    """Wait until every gateway takes its tail from the backplane."""
    _wait_for(lambda: all(_tail(g) == "backplane" for g in gateways), within,
              "every gateway's tail on the backplane")  # fmt: skip


def _ready_on(relay: RelayProcess, tail: str) -> bool:
    """True, or AssertionError unless the gateway is ready with its tail on ``tail``."""
    status, body = _readyz(relay)
    assert status == 200, body
    assert body["checks"]["backplane"]["tail"] == tail, body
    return True


def _roles(database_url: str) -> dict[str, list[str]]:
    """Each live replica's roles as ``relay status --json`` reports them."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "status", "--json"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return {r["replica_id"]: list(r["roles"]) for r in json.loads(done.stdout)["replicas"]}


def _has_role(database_url: str, replica_id: str, role: str) -> bool:
    return role in _roles(database_url).get(replica_id, [])


def _grew(gateway: RelayProcess, before: float) -> bool:
    return _metric(gateway, RECEIVED) > before


def _carried_by_the_backplane(
    database_url: str, gateway: RelayProcess, ledger: Ledger, restaurant: uuid.UUID,
    subscribers: list[Subscriber], seed: int, what: str,
) -> None:  # fmt: skip
    """Write a few events at a time until a batch reaches the gateway from
    NATS, within 20 s. One batch may still come from the log by design: a
    publisher whose acks are slow (a loaded disk under JetStream) lets the
    gateway's sweep read the head first, and the late message is then skipped
    as already delivered."""
    deadline = time.monotonic() + 20
    while True:
        before = _metric(gateway, RECEIVED)
        _write(database_url, ledger, [restaurant], seed=seed)
        _wait_for(lambda: received_all(ledger, subscribers), 10, what)
        try:
            _wait_for(partial(_grew, gateway, before), 2, f"{what} from NATS")
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        seed += 100


def _write(database_url: str, ledger: Ledger, restaurants: list[uuid.UUID], seed: int) -> int:
    """Commit a few orders' chains; how many events were committed."""
    before = len(ledger.committed)
    write_orders(
        f"{database_url}?application_name={_WRITER_APP}", ledger, restaurants, 5, seed=seed
    )
    return len(ledger.committed) - before


def _subscribe(
    restaurants: Sequence[uuid.UUID], per_restaurant: int, gateways: Sequence[RelayProcess],
    stop: threading.Event, *, hop: bool = True,
) -> tuple[list[Subscriber], list[threading.Thread]]:  # fmt: skip
    """Subscribers (``per_restaurant`` each) of ``gateways``, started: hopping
    between them, or (``hop=False``) staying on one stream, so that a
    gateway always has one open and takes every event from the backplane (a
    gateway with no stream open only skips ahead, counting nothing)."""
    budget = (20, 400) if hop else (10**9, 10**9)
    subscribers = [
        Subscriber(r, mint_token(SECRET, subject=f"staff-{i}", restaurant_ids=[r]),
                   random.Random(i), budget=budget)
        for i, r in enumerate(list(restaurants) * per_restaurant)
    ]  # fmt: skip
    threads = [threading.Thread(target=s.run, args=(gateways, stop)) for s in subscribers]
    for thread in threads:
        thread.start()
    return subscribers, threads


# -- under faults --------------------------------------------------------------

# How long a JetStream publish waits for its ack (relay/backplane/connection.py)
# and a margin.
_PUBLISH_TIMEOUT = 6.0


def _counts(gateways: Sequence[RelayProcess]) -> list[tuple[int, int]]:
    """Each gateway's events from the backplane and events read from the log."""
    return [(int(_metric(g, RECEIVED)), int(_metric(g, READ_BACK))) for g in gateways]


def _calm(
    database_url: str, ledger: Ledger, restaurants: list[uuid.UUID], gateways: list[RelayProcess],
    subscribers: list[Subscriber],
) -> list[tuple[int, int]]:  # fmt: skip
    """Write for a few seconds with no fault (and until every gateway took some
    of it from the backplane) and let it arrive: what each gateway took from
    the backplane and read from the log meanwhile."""
    before = _counts(gateways)

    def delta() -> list[tuple[int, int]]:
        now = _counts(gateways)
        return [(r - r0, b - b0) for (r, b), (r0, b0) in zip(now, before, strict=True)]

    started = time.monotonic()
    seed = 10_001
    while time.monotonic() - started < 3 or not all(r > 0 for r, _b in delta()):
        assert time.monotonic() - started < 20, f"a gateway took nothing from it: {delta()}"
        _write(database_url, ledger, restaurants, seed=seed)
        seed += 1
    settle(lambda: received_all(ledger, subscribers))
    return delta()


def _faults(
    server: NatsServer,
    dispatcher: RelayProcess,
    gateways: list[RelayProcess],
    stop: threading.Event,
    log: list[tuple[float, str]],
    rng: random.Random,
    soak: bool,
) -> None:
    """In order: NATS restarted, a gateway killed, the publishing dispatcher
    killed (each replica started again at once). Once, or over and over in a soak."""
    sequence = ["restart_nats", "kill_gateway", "kill_dispatcher"]
    step = 0
    while not stop.wait(2.5):
        if step == len(sequence) and not soak:
            return
        action = sequence[step % len(sequence)]
        step += 1
        if action == "restart_nats":
            server.restart(down_for=1.0)
        elif action == "kill_gateway":
            victim = rng.choice(gateways)
            victim.kill()
            victim.start(wait=False)
        else:
            dispatcher.kill()
            dispatcher.start(wait=False)
        log.append((time.monotonic(), action))


@pytest.mark.parametrize(
    "seconds", [15, pytest.param(150, marks=[pytest.mark.soak, pytest.mark.timeout(900)])]
)
def test_every_event_reaches_every_subscriber_once_in_order_through_backplane_faults(
    cluster: ThrowawayPostgres, seconds: int
) -> None:
    """Each fault loses or repeats part of the backplane's stream (messages
    NATS never got, a tail resuming mid-stream, a takeover publishing again
    what was published): the gateways must fill every gap from the log and
    drop every repeat, for streams that hop between them meanwhile."""
    rng = random.Random(7)
    restaurants = [uuid.uuid4() for _ in range(3)]
    ledger = Ledger()
    injected: list[tuple[float, str]] = []
    with nats_server() as server:
        dispatcher = _dispatcher(cluster.dsn, server, "dispatcher")
        gateways = [_gateway(cluster.dsn, server, f"gateway-{i}") for i in range(3)]
        with _running([dispatcher, *gateways]):
            _on_backplane(gateways, 10)
            stop_clients, stop_faults = threading.Event(), threading.Event()
            subscribers, threads = _subscribe(restaurants, 3, gateways, stop_clients)
            faults = threading.Thread(
                target=_faults,
                args=(server, dispatcher, gateways, stop_faults, injected, rng, seconds > 60),
            )
            try:
                faults.start()
                deadline = time.monotonic() + seconds

                def write(seed: int) -> None:
                    _write(cluster.dsn, ledger, restaurants, seed)

                write_until(deadline, write)
                stop_faults.set()
                faults.join(30)
                revive([dispatcher, *gateways])
                _on_backplane(gateways, 15)
                # A calm stretch after the faults: there the backplane must
                # bring nearly everything. It starts once a publisher that a
                # lost NATS caught mid-publish has given up on its ack (the
                # JetStream timeout, 5 s): until then the gateways read.
                last_fault = injected[-1][0] if injected else 0.0
                time.sleep(max(0.0, last_fault + _PUBLISH_TIMEOUT - time.monotonic()))
                calm = _calm(cluster.dsn, ledger, restaurants, gateways, subscribers)
                overall = _counts(gateways)
            finally:
                stop_all([stop_faults, stop_clients], threads, [])
    problems = check_deliveries(ledger, subscribers)
    total = sum(len(s.received) for s in subscribers)
    names = [action for _at, action in injected]
    print(
        f"\nledger: events={len(ledger.committed)} rolled_back={len(ledger.rolled_back)} "
        f"faults={len(names)} ({', '.join(names)}) deliveries={total} "
        f"reconnects={sum(s.reconnects for s in subscribers)} problems={len(problems)}\n"
        f"per gateway (since its last start), from the backplane / read from the log: "
        f"{overall}\ncalm stretch after the faults: {calm}"
    )
    assert len(ledger.committed) > 100
    assert names[:3] == ["restart_nats", "kill_gateway", "kill_dispatcher"]
    assert problems == []
    # The backplane really carried the tail: once the faults are over every
    # gateway takes its events from it and reads (almost) none from the log.
    received, read_back = sum(r for r, _b in calm), sum(b for _r, b in calm)
    assert all(r > 0 for r, _b in calm), calm
    assert read_back <= 0.1 * received, calm
    # Over the whole run too, faults included: each lost NATS costs reads of
    # what was written meanwhile, a few seconds' worth (not bounded in a soak,
    # where NATS goes every 7.5 s).
    received, read_back = sum(r for r, _b in overall), sum(b for _r, b in overall)
    assert seconds > 60 or received >= read_back / 2, overall


# -- while NATS is down --------------------------------------------------------


def test_a_gateway_serves_from_the_database_while_nats_is_down_and_returns_to_it(
    cluster: ThrowawayPostgres,
) -> None:
    """A lost NATS must not take a gateway out of its load balancer: it stays
    ready and serves from PostgreSQL, says so (/readyz, relay status), and
    goes back to the backplane by itself when NATS returns."""
    restaurant = uuid.uuid4()
    ledger = Ledger()
    with nats_server() as server:
        dispatcher = _dispatcher(cluster.dsn, server, "publisher")
        gateway = _gateway(cluster.dsn, server, "gateway")
        stop = threading.Event()
        with _running([dispatcher, gateway]):
            _wait_for(lambda: _tail(gateway) == "backplane", 10, "the tail on the backplane")
            subscribers, threads = _subscribe([restaurant], 1, [gateway], stop, hop=False)
            try:
                # Live: once the stream is open, events come over the backplane.
                _write(cluster.dsn, ledger, [restaurant], seed=1)
                _wait_for(lambda: received_all(ledger, subscribers), 10, "the stream open")
                _carried_by_the_backplane(cluster.dsn, gateway, ledger, restaurant, subscribers,
                                          2, "events while live")  # fmt: skip

                # NATS down: still ready, the tail from the database.
                server.stop()
                _wait_for(lambda: _tail(gateway) == "database", 5, "the tail on the database")
                received_before, read_before = (
                    _metric(gateway, RECEIVED),
                    _metric(gateway, READ_BACK),
                )
                written = _write(cluster.dsn, ledger, [restaurant], seed=3)
                _wait_for(
                    lambda: received_all(ledger, subscribers), 10, "events while NATS is down"
                )
                status, body = _readyz(gateway)
                assert status == 200, body
                assert body["checks"]["backplane"]["tail"] == "database", body
                assert body["checks"]["backplane"]["ok"] is True, body
                assert body["checks"]["listener"] is True, body  # LISTEN while down
                assert _metric(gateway, RECEIVED) == received_before
                assert _metric(gateway, READ_BACK) - read_before >= written
                # relay status says so too, and /readyz stays 200 meanwhile.
                _wait_for(
                    lambda: (
                        _ready_on(gateway, "database")
                        and _has_role(cluster.dsn, "gateway", "tail:database")
                        and _has_role(cluster.dsn, "publisher", "backplane-publisher:down")
                    ),
                    _STATUS_WITHIN,
                    "relay status: tail:database, publisher down",
                )

                # NATS back: the tail returns to it and, once the publisher
                # is back too (it reconnects on its own back-off), new events
                # come over it.
                server.start()
                took = _wait_for(lambda: _tail(gateway) == "backplane", 10, "back on the backplane")
                _wait_for(lambda: _has_role(cluster.dsn, "gateway", "tail:backplane"),
                          _STATUS_WITHIN, "relay status: tail:backplane")  # fmt: skip
                _wait_for(lambda: _has_role(cluster.dsn, "publisher", "backplane-publisher"),
                          _STATUS_WITHIN, "relay status: backplane-publisher")  # fmt: skip
                _carried_by_the_backplane(cluster.dsn, gateway, ledger, restaurant, subscribers,
                                          4, "events after NATS is back")  # fmt: skip
                print(f"\nback on the backplane {took:.1f} s after NATS started again")
                settle(lambda: received_all(ledger, subscribers), within=5)
            finally:
                stop_all([stop], threads, [])
    assert check_deliveries(ledger, subscribers) == []


# -- no LISTEN on a live backplane ---------------------------------------------

# Every session of the dispatcher carries this name (an application_name in
# DATABASE_URL wins over the relay's own), so whatever else LISTENs is the gateway's.
_DISPATCHER_APP = "dispatcher-under-test"

_LISTENERS_SQL = """
SELECT pid, application_name, left(query, 60) FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
  AND application_name NOT IN (%(dispatcher)s, %(writer)s)
  AND (application_name = 'relay listener' OR query ILIKE 'LISTEN%%')
"""


def _gateway_listeners(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            _LISTENERS_SQL, {"dispatcher": _DISPATCHER_APP, "writer": _WRITER_APP}
        ).fetchall()


def _gateway_sessions(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'relay gateway%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_gateway_on_a_live_backplane_holds_no_listen_session(cluster: ThrowawayPostgres) -> None:
    """Fifty gateways on a live backplane must not hold fifty LISTEN sessions
    of the order database; one that did would show here, as it does (the
    control) while NATS is down."""
    restaurant = uuid.uuid4()
    ledger = Ledger()
    with nats_server() as server:
        dispatcher = _dispatcher(
            f"{cluster.dsn}?application_name={_DISPATCHER_APP}", server, "publisher"
        )
        gateway = _gateway(cluster.dsn, server, "gateway")
        stop = threading.Event()
        with _running([dispatcher, gateway]):
            _wait_for(lambda: _tail(gateway) == "backplane", 10, "the tail on the backplane")
            # The listener taken while the tail was connecting goes.
            _wait_for(lambda: not _gateway_listeners(cluster.dsn), 5, "no LISTEN session")
            assert _gateway_sessions(cluster.dsn) > 0  # the query sees the gateway's sessions
            subscribers, threads = _subscribe([restaurant], 1, [gateway], stop, hop=False)
            try:
                for seed in range(3):  # events flowing, streams open: still no LISTEN
                    _write(cluster.dsn, ledger, [restaurant], seed=seed)
                    assert _gateway_listeners(cluster.dsn) == []
                    time.sleep(0.5)
                _wait_for(lambda: received_all(ledger, subscribers), 10, "events while live")
                assert _gateway_listeners(cluster.dsn) == []
                assert _readyz(gateway)[1]["checks"]["listener"] is None

                # The control: with NATS down the gateway LISTENs, and the query sees it.
                server.stop()
                _wait_for(lambda: bool(_gateway_listeners(cluster.dsn)), 5, "a LISTEN session")
                _write(cluster.dsn, ledger, [restaurant], seed=10)
                _wait_for(lambda: received_all(ledger, subscribers), 10, "events via LISTEN")

                server.start()
                _wait_for(lambda: _tail(gateway) == "backplane", 10, "back on the backplane")
                _wait_for(lambda: not _gateway_listeners(cluster.dsn), 5, "the LISTEN session gone")
            finally:
                stop_all([stop], threads, [])
    assert check_deliveries(ledger, subscribers) == []
