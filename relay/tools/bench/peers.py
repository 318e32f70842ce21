"""The peers a user would pick instead of the relay, draining the same backlog.

pgqueuer and procrastinate are job queues, not outbox relays: each job is
claimed, handed to a handler (here a no-op) and marked done, with no
validation, no rendering and no fan-out to subscribers. The bench fills each
one's own fresh database through the library's own bulk API with the relay's
events as job payloads (not timed), then times its worker draining them in a
process of its own (``python -m relay.tools.bench.workers peer``), as the
relay drains in its own. Both libraries are the ``bench`` extra, never a
runtime dependency: their modules are imported only here, and only when the
``peers`` scenario runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.sql import query

if TYPE_CHECKING:
    import procrastinate
    from pgqueuer import Queries

__all__ = ["PEERS", "Peer", "drain", "payloads"]

# The task (procrastinate) or entrypoint (pgqueuer) every job is enqueued for.
_ENTRYPOINT = "bench"


@dataclass(frozen=True)
class Peer:
    """How the bench installs, fills, drains and watches one peer."""

    name: str
    # Its schema, then the jobs through its own bulk API (not timed).
    fill: Callable[[str, Iterable[list[str]]], Coroutine[Any, Any, None]]
    run: Callable[[dict[str, Any], Callable[[], None]], Awaitable[int]]
    # Jobs not yet done (queued or running): the bench polls it to stop the drain.
    pending_query: str
    # Worker settings to try (the library's defaults, then larger batches or
    # more jobs in flight); the fastest on ``trial_events`` drains the backlog.
    candidates: tuple[dict[str, Any], ...]
    trial_events: int


def payloads(source_url: str, count: int, chunk: int = 10_000) -> Iterator[list[str]]:
    """The first ``count`` pending events' payloads (JSON text) of a relay's outbox, in
    id order, ``chunk`` at a time: what each peer's jobs carry, so that both
    sides move the same bytes per event."""
    with (
        psycopg.connect(source_url) as conn,
        conn.cursor(name="bench_payloads") as cursor,
    ):
        cursor.itersize = chunk
        cursor.execute(query("bench_outbox_payloads"), {"count": count})
        while rows := cursor.fetchmany(chunk):
            yield [text for (text,) in rows]


# --- pgqueuer -----------------------------------------------------------------


async def _pgqueuer_fill(url: str, chunks: Iterable[list[str]]) -> None:
    """``pgq install``'s schema, then every chunk as one ``Queries.enqueue`` batch."""
    from pgqueuer import Queries
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        await queries.install()
        for chunk in chunks:
            n = len(chunk)
            await queries.enqueue([_ENTRYPOINT] * n, [p.encode() for p in chunk], [0] * n)


async def _pgqueuer_queries(driver: str, url: str) -> Queries:
    """pgqueuer's queries over one connection of ``driver``: asyncpg (its own
    benchmark's default) or psycopg (the relay's driver)."""
    from pgqueuer import Queries

    if driver == "psycopg":
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        return Queries.from_psycopg_connection(conn)
    import asyncpg  # type: ignore[import-untyped]
    from pgqueuer.db import AsyncpgDriver

    params = conninfo_to_dict(url)
    connection = await asyncpg.connect(
        host=params.get("host"),
        port=int(str(params["port"])) if params.get("port") else None,
        user=params.get("user"),
        password=params.get("password"),
        database=params.get("dbname"),
    )
    return Queries(AsyncpgDriver(connection))


async def _pgqueuer_run(spec: dict[str, Any], ready: Callable[[], None]) -> int:
    """``dequeuers`` queue managers (one connection each, as pgqueuer's own
    benchmark runs them) taking ``batch_size`` jobs per dequeue."""
    from pgqueuer import QueueManager
    from pgqueuer.models import Job

    handled = 0

    async def noop(job: Job) -> None:
        nonlocal handled
        handled += 1

    managers = []
    for _ in range(int(spec["dequeuers"])):
        manager = QueueManager(await _pgqueuer_queries(spec["driver"], spec["database_url"]))
        manager.entrypoint(_ENTRYPOINT)(noop)
        managers.append(manager)

    def stop() -> None:
        for manager in managers:
            manager.shutdown.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    ready()
    await asyncio.gather(*(m.run(batch_size=int(spec["batch_size"])) for m in managers))
    return handled


# --- procrastinate ------------------------------------------------------------


def _procrastinate_app(url: str, pool_size: int) -> procrastinate.App:
    import procrastinate

    connector = procrastinate.PsycopgConnector(conninfo=url, min_size=pool_size, max_size=pool_size)
    return procrastinate.App(connector=connector)


async def _procrastinate_fill(url: str, chunks: Iterable[list[str]]) -> None:
    """``procrastinate schema --apply``'s schema, then every chunk as one
    ``batch_defer_async`` (the payload is the job's keyword arguments)."""
    app = _procrastinate_app(url, 1)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        deferrer = app.configure_task(_ENTRYPOINT)
        for chunk in chunks:
            await deferrer.batch_defer_async(*map(json.loads, chunk))


async def _procrastinate_run(spec: dict[str, Any], ready: Callable[[], None]) -> int:
    """One worker with ``concurrency`` jobs in flight (a pooled connection each)."""
    concurrency = int(spec["concurrency"])
    app = _procrastinate_app(spec["database_url"], concurrency + 2)
    handled = 0

    @app.task(name=_ENTRYPOINT)
    async def noop(**event: Any) -> None:
        nonlocal handled
        handled += 1

    async with app.open_async():
        ready()
        # Its own SIGTERM handler stops the worker gracefully.
        await app.run_worker_async(
            concurrency=concurrency, delete_jobs=spec["delete_jobs"], wait=True
        )
    return handled


PEERS = {
    "pgqueuer": Peer(
        "pgqueuer",
        _pgqueuer_fill,
        _pgqueuer_run,
        "bench_pgqueuer_pending",
        (
            # Its own benchmark's defaults; then batches of 100, the size that
            # measured 8.5k jobs/s here before (docs/performance.md).
            {"driver": "asyncpg", "dequeuers": 5, "batch_size": 10},
            {"driver": "asyncpg", "dequeuers": 1, "batch_size": 100},
            {"driver": "asyncpg", "dequeuers": 5, "batch_size": 100},
            {"driver": "psycopg", "dequeuers": 5, "batch_size": 100},
        ),
        trial_events=20_000,
    ),
    "procrastinate": Peer(
        "procrastinate",
        _procrastinate_fill,
        _procrastinate_run,
        "bench_procrastinate_pending",
        (
            # Its defaults (one job at a time, done jobs kept); then jobs in
            # flight together, done jobs deleted.
            {"concurrency": 1, "delete_jobs": "never"},
            {"concurrency": 4, "delete_jobs": "successful"},
            {"concurrency": 10, "delete_jobs": "successful"},
        ),
        trial_events=4_000,  # ~500 jobs/s: a trial of ~8 s
    ),
}


def drain(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker process: the peer's worker runs until SIGTERM (the bench sends it
    once the queue is empty); the jobs it handled and its CPU since ``ready``."""
    logging.basicConfig(level=logging.WARNING)  # on stderr: stdout carries the protocol
    peer = PEERS[spec["peer"]]
    began: list[float] = []

    def ready() -> None:
        began.append(time.process_time())
        print("ready", flush=True)

    async def main() -> int:
        return await peer.run(spec, ready)

    try:
        import uvloop
    except ImportError:  # no uvloop on Windows: the relay's loop is plain asyncio there too
        handled = asyncio.run(main())
    else:  # the loop the relay runs on (uvicorn's, with uvloop installed)
        handled = uvloop.run(main())
    return {"handled": handled, "cpu_seconds": time.process_time() - began[0]}
