"""The backplane scenario: what gateway processes read from PostgreSQL per event.

One ``relay run --dispatcher-only`` records the log; N ``relay run
--gateway-only`` processes (1, 2 and 4) each serve SSE subscribers on every
restaurant. The producer commits a fixed number of events back to back, and
a run ends when every subscriber has every event of its restaurant. Each gateway
count runs twice, in a fresh database each time: with ``RELAY_BACKPLANE`` (the
dispatcher's process publishes each checked page to NATS JetStream, and the
gateways take their live tail from it) and without (each gateway reads every
event from PostgreSQL, after NOTIFY or its sweep). The backplane's promise is
that the database's work stops growing with the number of gateways, so both
are counted, by the relay and by PostgreSQL:

- ``db_reads_per_event``: rows of the log the gateways read from PostgreSQL,
  per event: the sum over gateways of ``relay_hub_read_back_events_total``
  (each gateway's ``/metrics``, before and after the run), over the events.
  Without the backplane every gateway reads every event: N. With it, 0 while
  the backplane keeps up. A gateway whose sweep finds the head it saw a sweep
  (a second) earlier still not brought takes the publisher for dead and reads
  the log up to the head: a burst that keeps the publisher (or the gateway)
  that far behind shows here as reads.
- ``db_tuples_per_event``: what PostgreSQL counted, trusting no relay: the
  bench database's ``tup_returned + tup_fetched`` (``pg_stat_database``) over
  the run, per event. It includes the dispatcher's reads (the recorder's, the
  same share for any N), the producer's inserts, the sessions' own queries
  while the run lasts (sweeps, heartbeats) and catalog lookups a session
  reports late (an idle one holds its statistics up to 10 s, and reports them
  on exit): a few thousand tuples a run, per gateway, which only a large run
  makes small per event. What grows with N is the gateways' reads.
- ``backplane_events_per_event``: events the gateways took from JetStream
  (``relay_backplane_received_events_total``), summed, per event: N when the
  backplane brought every event to every gateway, 0 without it (an event
  that came while the gateway was reading its stretch counts in both).
- ``deliveries_per_s``: SSE deliveries to every subscriber of every gateway,
  from the producer's commit until the last subscriber had all of its
  events. The subscribers run in one client process beside the relays, on
  the same cores: a figure of this machine, not of a deployment.

Every run has its own JetStream stream (``BENCH_<hex>``, subject prefix
``bench<hex>``) on the NATS server of ``RELAY_BACKPLANE`` (default
``nats://127.0.0.1:4222``), deleted after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.backplane import BackplaneConfig, parse_backplane_url
from relay.sql import query
from relay.tools.bench.env import Bench, RelayServer, Worker

__all__ = ["DEFAULT_NATS", "GATEWAYS", "measure"]

DEFAULT_NATS = "nats://127.0.0.1:4222"
GATEWAYS = (1, 2, 4)
MODES = ("backplane", "database")

_READ_BACK = "relay_hub_read_back_events_total"
_RECEIVED = "relay_backplane_received_events_total"
# Events per producer transaction: a burst of orders as a busy service
# commits them. One transaction of thousands of rows is another workload: its
# window holds more than a page of each read, which, planned on statistics
# that have not seen the burst, fetches and sorts the window's remaining rows
# for every page, and that would swamp the gateways' reads being counted.
_PRODUCER_BATCH = 100
_WARM_TIMEOUT = 30.0  # seconds for the path to carry a first event end to end
# Seconds after the warm-up before counting: a busy session reports its
# statistics at most once a second, so by then the start-up's are in.
_STATS_SETTLE = 1.1


def measure(
    bench: Bench,
    *,
    events: int,
    restaurants: int,
    subscribers: int,
    gateways: tuple[int, ...] = GATEWAYS,
) -> dict[str, Any]:
    """Each gateway count with and without the backplane, the two interleaved:
    the machine's load drifts, and the delivery rates are compared."""
    if subscribers < restaurants:
        raise ValueError("every gateway needs a subscriber on every restaurant")
    events -= events % restaurants  # every stream expects the same whole number
    base = bench.backplane or DEFAULT_NATS
    server = _reachable(base)
    figures: dict[str, dict[str, dict[str, float]]] = {
        name: {mode: {} for mode in MODES}
        for name in (
            "db_reads_per_event",
            "db_tuples_per_event",
            "backplane_events_per_event",
            "deliveries_per_s",
            "seconds",
        )
    }
    reconnects = 0
    for count in gateways:
        for mode in MODES:
            with contextlib.ExitStack() as stack:
                backplane = stack.enter_context(_own_stream(base)) if mode == "backplane" else None
                run = _run(bench, backplane, count, events, restaurants, subscribers)
            reconnects += int(run.pop("reconnects"))
            for name, value in run.items():
                figures[name][mode][str(count)] = value
    reads = figures["db_reads_per_event"]
    return {
        "nats": server,
        "events": events,
        "restaurants": restaurants,
        "subscribers_per_gateway": subscribers,
        "gateways": list(gateways),
        "reconnects": reconnects,
        # The headline for the one-line table, in the order of ``gateways``.
        "backplane_reads_per_event": [reads["backplane"][str(n)] for n in gateways],
        "database_reads_per_event": [reads["database"][str(n)] for n in gateways],
        **figures,
    }


def _run_url(base: str, tag: str) -> str:
    """``base`` with a stream and subject prefix of this run's own (other
    options, such as ``max_age``, kept)."""
    parts = urlsplit(base)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    options |= {"stream": f"BENCH_{tag.upper()}", "prefix": f"bench{tag}"}
    return urlunsplit(parts._replace(query=urlencode(options)))


@contextlib.contextmanager
def _own_stream(base: str) -> Iterator[str]:
    """A backplane URL of a stream of this run's own, deleted after the run
    (JetStream keeps a stream, and its messages, until told otherwise)."""
    url = _run_url(base, secrets.token_hex(4))
    config = parse_backplane_url(url)
    try:
        yield url
    except BaseException:
        with contextlib.suppress(Exception):  # the run's failure is the one to report
            _delete_stream(config)
        raise
    _delete_stream(config)


def _reachable(url: str) -> str:
    """The server's name (no credentials) once NATS answers with JetStream on;
    a clear failure otherwise, before any relay is started."""
    config = parse_backplane_url(url)

    async def check() -> None:
        nc = await _connect(config)
        try:
            await nc.jetstream(timeout=5.0).account_info()
        finally:
            await nc.close()

    try:
        asyncio.run(check())
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise RuntimeError(
            f"backplane: no NATS with JetStream at {config.name} ({reason}): "
            "set RELAY_BACKPLANE to a NATS server with JetStream"
        ) from None
    return config.name


async def _connect(config: BackplaneConfig) -> Any:
    """One connection, or an error within seconds: nats-py retries an
    unreachable server for ever when ``max_reconnect_attempts`` is 0, whatever
    ``allow_reconnect`` says, so it is 1 here (two tries) and bounded again."""
    import nats  # the relay's optional extra: imported only when a backplane is measured

    async def quiet(_error: Exception) -> None:
        return None

    connecting = nats.connect(
        config.url,
        connect_timeout=3,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        error_cb=quiet,
    )
    return await asyncio.wait_for(connecting, 10)


def _delete_stream(config: BackplaneConfig) -> None:

    async def delete() -> None:
        import nats.js.errors

        nc = await _connect(config)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):  # never created: no relay ran
                await nc.jetstream(timeout=5.0).delete_stream(config.stream)
        finally:
            await nc.close()

    asyncio.run(delete())


def _run(
    bench: Bench,
    backplane: str | None,
    gateways: int,
    events: int,
    restaurants: int,
    subscribers: int,
) -> dict[str, float]:
    """One dispatcher and ``gateways`` gateways in a fresh database; the
    producer commits ``events`` once every subscriber is open and the path
    has carried a first event."""
    ids = [uuid.uuid4() for _ in range(restaurants)]
    env = {"RELAY_BACKPLANE": backplane or ""}
    with bench.database() as url:
        name = str(conninfo_to_dict(url)["dbname"])
        servers: list[RelayServer] = []
        worker: Worker | None = None
        try:
            servers.append(RelayServer(bench, url, args=("--dispatcher-only",), **env))
            gates = [
                RelayServer(bench, url, args=("--gateway-only",), **env) for _ in range(gateways)
            ]
            servers += gates
            for server in servers:
                server.wait_ready()
            if backplane is not None:
                for gate in gates:
                    _wait_tail(gate)
            streams = [
                {
                    "path": f"/v1/restaurants/{ids[i % restaurants]}/stream",
                    "expect": events // restaurants,
                    "port": gate.port,
                }
                for gate in gates
                for i in range(subscribers)
            ]
            spec = {"host": "127.0.0.1", "token": bench.token(ids), "streams": streams}
            worker = Worker("subscribe", {**spec, "timeout": 600})
            worker.wait_ready()
            with psycopg.connect(url, autocommit=True) as producer:
                _warm(producer, gates, via_backplane=backplane is not None)
                time.sleep(_STATS_SETTLE)
                before = [gate.metrics() for gate in gates]
                tuples = _tuples(bench, name)
                began = time.monotonic()
                _produce(producer, ids, events)
                seen = worker.result()
                worker = None
                after = [gate.metrics() for gate in gates]
            _stop(servers)
            # Every session of the database gone: each reported its statistics on exit.
            _wait_sessions_gone(bench, name)
            tuples = _tuples(bench, name) - tuples
        finally:
            if worker is not None:
                with contextlib.suppress(Exception):  # the first failure is the one to report
                    worker.stop()
            for server in servers:
                server.stop()
    delivered = sum(seen["events"])
    expected = gateways * subscribers * (events // restaurants)
    if not seen["complete"] or seen["completed"] is None:
        raise RuntimeError(f"backplane: subscribers received {delivered} of {expected} events")
    elapsed = float(seen["completed"]) - began

    def per_event(metric: str) -> float:
        return round(sum(a.get(metric, 0.0) - b.get(metric, 0.0)
                         for a, b in zip(after, before, strict=True)) / events, 3)  # fmt: skip

    return {
        "db_reads_per_event": per_event(_READ_BACK),
        "db_tuples_per_event": round(tuples / events, 2),
        "backplane_events_per_event": per_event(_RECEIVED),
        "deliveries_per_s": round(delivered / elapsed),
        "seconds": round(elapsed, 3),
        "reconnects": int(seen["reconnects"]),
    }


def _wait_tail(gate: RelayServer, timeout: float = 30.0) -> None:
    """Until the gateway says it takes its tail from the backplane."""
    deadline = time.monotonic() + timeout
    checks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        checks = gate.readiness()
        if checks.get("backplane", {}).get("tail") == "backplane":
            return
        time.sleep(0.05)
    raise RuntimeError(f"backplane: a gateway's tail never came from NATS: {checks}")


def _taken(samples: dict[str, float]) -> tuple[float, float]:
    """Events a gateway took: read from the log, and from the backplane."""
    return samples.get(_READ_BACK, 0.0), samples.get(_RECEIVED, 0.0)


def _warm(
    producer: psycopg.Connection[Any], gates: list[RelayServer], *, via_backplane: bool
) -> None:
    """One event at a time, of a restaurant nobody follows, until every gateway
    took one (and, with the backplane, took it from JetStream): the counting
    starts on a path that works end to end, not on its start-up (a page
    recorded before the publisher connected is read from the log)."""
    stray = [uuid.uuid4()]
    deadline = time.monotonic() + _WARM_TIMEOUT
    while time.monotonic() < deadline:
        before = [_taken(gate.metrics()) for gate in gates]
        _produce(producer, stray, 1)
        came = _until_taken(gates, before, deadline)
        if came is not None and (not via_backplane or all(
            now[1] > was[1] for now, was in zip(came, before, strict=True)
        )):  # fmt: skip
            return
        time.sleep(0.1)
    where = "from the backplane " if via_backplane else ""
    raise RuntimeError(f"backplane: the gateways took no event {where}within {_WARM_TIMEOUT} s")


def _until_taken(
    gates: list[RelayServer], before: list[tuple[float, float]], deadline: float
) -> list[tuple[float, float]] | None:
    """What each gateway took, once every one took more than ``before`` (None at the deadline)."""
    while time.monotonic() < deadline:
        came = [_taken(gate.metrics()) for gate in gates]
        if all(sum(now) > sum(was) for now, was in zip(came, before, strict=True)):
            return came
        time.sleep(0.02)
    return None


def _produce(conn: psycopg.Connection[Any], restaurants: list[uuid.UUID], count: int) -> None:
    """``count`` events, round-robin over ``restaurants``, committed back to
    back in transactions of ``_PRODUCER_BATCH``."""
    for first in range(1, count + 1, _PRODUCER_BATCH):
        last = min(count, first + _PRODUCER_BATCH - 1)
        conn.execute(
            query("bench_fill_outbox"), {"first": first, "last": last, "restaurants": restaurants}
        )


def _tuples(bench: Bench, dbname: str) -> int:
    """Rows the database's scans returned and fetched so far (every session's,
    as reported to the statistics: a session reports at most once a second,
    and on exit)."""
    with psycopg.connect(bench.server_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT tup_returned + tup_fetched FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _stop(servers: list[RelayServer]) -> None:
    """SIGTERM to every relay at once, then each reaped: they shut down together."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        server.stop()


def _wait_sessions_gone(bench: Bench, dbname: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(bench.server_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()
            if row is not None and int(row[0]) == 0:
                return
            time.sleep(0.05)
    raise RuntimeError(f"backplane: sessions of {dbname} outlived their relays by {timeout} s")
