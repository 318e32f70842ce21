"""``relay run``: the dispatcher (the window recorder) and the HTTP gateway in
one sidecar process.

SIGTERM drains: the recorder stops between windows (a window is one
statement; nothing is half-recorded), every stream is closed cleanly so
clients reconnect elsewhere with their cursor, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import uvicorn
from psycopg_pool import AsyncConnectionPool

from relay.backplane import parse_backplane_url
from relay.db import prepare_session, role_params
from relay.gateway.app import GatewayConfig, create_app
from relay.gateway.auth import AuthConfig, TokenVerifier
from relay.gateway.connections import AbortableHttp
from relay.gateway.hub import Hub
from relay.gateway.sse import OpenStreams
from relay.gateway.streams import StreamOptions
from relay.log import Page
from relay.maintenance import Maintenance
from relay.metrics import M
from relay.migrate import schema_problem
from relay.publishers import Follower, broker_for, parse_publishers, run_followers
from relay.recorder import Recorder, RecorderConfig
from relay.sessions import KEEPALIVE
from relay.settings import Settings
from relay.sla import SlaConfig, SlaWatcher

if TYPE_CHECKING:
    from relay.backplane.reader import Reader
    from relay.backplane.writer import Writer

__all__ = ["run_event_loop", "serve"]

log = logging.getLogger("relay")


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where available (a faster loop for thousands of
    streams and the database I/O alike), else on asyncio's default loop."""
    _collect_garbage_rarely()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _collect_garbage_rarely() -> None:
    """The relay allocates a handful of objects per event and per delivery and
    keeps almost none; its long-lived objects (modules, models, ten thousand
    subscribers) never form garbage cycles. CPython's default thresholds run
    a young collection every 700 allocations and make each full collection
    walk every one of those objects: 10-20 % of the drain's CPU measured.
    Frozen start-up objects are never walked; young collections run every
    50,000 allocations."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: this process drains itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


_event_type = attrgetter("event_type")


def _observe(page: Page) -> None:
    M.checked.inc(page.rows)
    M.dead_lettered.inc(len(page.rejected))
    M.pii_dropped.inc(page.dropped_fields)
    if not page.events:
        return
    # One lag observation per page (its newest event): a histogram
    # observation per event would cost more than the event's frame.
    lag = (datetime.now(UTC) - page.events[-1].enqueued_at).total_seconds()
    M.publish_lag.observe(max(0.0, lag))
    for event_type, count in Counter(map(_event_type, page.events)).items():
        M.published.labels(event_type=event_type).inc(count)


Extra = tuple[str, Callable[[asyncio.Event], Coroutine[Any, Any, None]]]


async def serve(
    settings: Settings,
    *,
    dispatcher: bool = True,
    gateway: bool = True,
    extra: Sequence[Extra] = (),
) -> None:
    """Run until SIGTERM/SIGINT; returns after a clean drain.

    ``extra`` tasks (``relay demo``'s simulator) get the same stop event and
    live and die with the service, so one signal drains everything.
    """
    url = settings.require_database_url()
    if gateway:
        settings.require_jwt_key()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    roles = [r for r, on in (("dispatcher", dispatcher), ("gateway", gateway)) if on]
    backplane = parse_backplane_url(settings.backplane) if settings.backplane else None
    tail: Reader | None = None
    hub = (
        Hub(
            url,
            local_recorder=lambda: worker.backend_pid if worker is not None else None,
            local_check=lambda: worker.checked() if worker is not None else None,
            local_pending=lambda: worker is not None and not worker.decided,
            recent=settings.replay_memory,
            backplane_live=None if backplane is None else lambda: tail is not None and tail.live,
        )
        if gateway
        else None
    )
    writer: Writer | None = None
    if backplane is not None:
        from relay.backplane.reader import Reader
        from relay.backplane.writer import Writer

        if hub is not None:
            tail = Reader(backplane, hub.offered, lambda: hub.delivered, lambda: hub.following)
        if dispatcher:
            # The leading recorder's process publishes what it checks.
            writer = Writer(backplane)
    # Publishers run beside the dispatcher; one process per name publishes at a time.
    timeout = settings.query_timeout.total_seconds()
    followers = [
        Follower(url, config, broker_for(config), query_timeout=timeout)
        for config in parse_publishers(settings.publisher_urls)
    ] if dispatcher else []  # fmt: skip

    sla = (
        SlaWatcher(
            url,
            SlaConfig(
                not_accepted=settings.sla_not_accepted,
                not_ready=settings.sla_not_ready,
                delivery_grace=settings.sla_delivery_grace,
                park_beyond=settings.retention / 2,
            ),
            # Beside the recorder's lease: its pages come in hand, and the
            # open deadlines stay in one process's memory.
            local_check=lambda: worker.checked() if worker is not None else None,
        )
        if dispatcher and settings.sla_enabled
        else None
    )

    def on_page(page: Page) -> None:
        _observe(page)
        if hub is not None:
            hub.handed(page)
        if sla is not None:
            sla.handed(page)
        if writer is not None:
            writer.handed(page)

    worker = (
        Recorder(
            url,
            RecorderConfig(
                batch_size=settings.batch_size,
                wakeup=settings.wakeup,
                poll_idle=settings.poll_idle.total_seconds(),
                linger=settings.linger.total_seconds(),
                window_interval=settings.window_interval.total_seconds(),
                safety_sweep=settings.safety_sweep.total_seconds(),
                query_timeout=settings.query_timeout.total_seconds(),
            ),
            on_page=on_page,
        )
        if dispatcher
        else None
    )
    maintenance = Maintenance(
        url,
        replica_id=settings.replica_id,
        roles=lambda: roles + _backplane_roles(writer, tail),
        retention=settings.retention,
        published=lambda: worker.published if worker else 0,
    )
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(maintenance.run(stop), name="maintenance")
    ]
    if worker is not None:
        tasks.append(asyncio.create_task(worker.run(stop), name="dispatcher"))
        if sla is not None:
            tasks.append(asyncio.create_task(sla.run(stop), name="sla"))
    if writer is not None:
        tasks.append(asyncio.create_task(writer.run(stop), name="backplane-publisher"))
    if tail is not None:
        tasks.append(asyncio.create_task(tail.run(stop), name="backplane-tail"))
    if followers:
        # External publishers follow the log from their own durable offsets.
        tasks.append(asyncio.create_task(run_followers(followers, stop), name="publishers"))
    for name, start in extra:
        tasks.append(asyncio.create_task(start(stop), name=name))
    server: _Server | None = None
    open_streams: OpenStreams | None = None
    pool: AsyncConnectionPool[Any] | None = None
    if hub is not None:
        tasks.append(asyncio.create_task(hub.run(stop), name="hub"))
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=8,
            open=False,
            kwargs={"autocommit": True, **KEEPALIVE, **role_params(url, "gateway pool")},
            configure=prepare_session,
            timeout=5,
        )
        await pool.open(wait=False)
        verifier = TokenVerifier(
            AuthConfig(
                secret=settings.jwt_secret,
                jwks=settings.jwt_jwks,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )
        )

        async def readiness() -> dict[str, Any]:
            checks: dict[str, Any] = await _database_checks(pool)
            # Beside the leading recorder or on a live backplane the gateway
            # holds no LISTEN session.
            checks["listener"] = hub.listener_connected if hub.listening_needed else None
            if tail is not None or writer is not None:
                checks["backplane"] = _backplane_check(writer, tail)
            if worker is not None:
                checks["dispatcher"] = worker.running
            if followers:
                checks["publishers"] = {f.config.name: f.status.report() for f in followers}
            return checks

        app = create_app(
            hub=hub,
            pool=pool,
            verifier=verifier,
            config=GatewayConfig(
                stream=StreamOptions(
                    buffer=settings.subscriber_buffer, heartbeat=settings.heartbeat_seconds
                ),
                cors_origins=tuple(settings.cors_origin_list),
                max_connections=settings.max_connections,
                max_connections_per_subject=settings.max_connections_per_subject,
            ),
            readiness=readiness,
        )
        open_streams = app.state.open_streams
        server = _Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_config=None,
                access_log=False,
                lifespan="off",
                http=AbortableHttp,
                timeout_graceful_shutdown=max(1, int(settings.shutdown_grace.total_seconds())),
                backlog=4096,
            )
        )
        tasks.append(asyncio.create_task(server.serve(), name="http"))

    def drain(signame: str) -> None:
        if stop.is_set():
            return
        log.info("received %s: draining", signame)
        stop.set()
        if hub is not None:
            hub.close_all("shutdown")  # every stream ends with a last `retry:`
        if open_streams is not None:
            # ...but a write stuck on a client that stopped reading would
            # outlast the grace: such connections are dropped halfway through it.
            open_streams.hurry(max(0.5, settings.shutdown_grace.total_seconds() / 2))
        if server is not None:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain, sig.name)
    log.info(
        "relay started",
        extra={
            "roles": roles,
            "replica": settings.replica_id,
            "http": f"{settings.host}:{settings.port}" if gateway else None,
        },
    )
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is not None and not stop.is_set():
                raise task.exception()  # type: ignore[misc]
        if not stop.is_set():
            drain("exit")
        # The HTTP server runs its own grace (timeout_graceful_shutdown, from
        # when it notices should_exit): it gets a moment longer than the rest,
        # so its requests are never cancelled under it by ours.
        grace = settings.shutdown_grace.total_seconds()
        _, late = await asyncio.wait(tasks, timeout=grace + (1.0 if server is not None else 0.0))
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if pool is not None:
            await pool.close(timeout=1)
        log.info("relay stopped")


def _backplane_roles(writer: Writer | None, tail: Reader | None) -> list[str]:
    """What ``relay status`` shows of the backplane, as roles of this replica."""
    roles = []
    if writer is not None:
        roles.append(
            "backplane-publisher" if writer.state == "publishing" else "backplane-publisher:down"
        )
    if tail is not None:
        roles.append("tail:backplane" if tail.live else "tail:database")
    return roles


def _backplane_check(writer: Writer | None, tail: Reader | None) -> dict[str, Any]:
    """Ready either way: while the backplane is down the database serves the tail."""
    check: dict[str, Any] = {"ok": True}
    if tail is not None:
        check["tail"] = "backplane" if tail.live else "database"
        check["state"] = tail.state
    if writer is not None:
        check["publisher"] = writer.state
    return check


async def _database_checks(pool: AsyncConnectionPool[Any]) -> dict[str, Any]:
    """Reachable, and its schema still the one this code expects: a newer relay
    may migrate the database under a running one."""
    try:
        async with pool.connection(timeout=2) as conn:
            problem = await asyncio.wait_for(schema_problem(conn), 2)
    except Exception:
        return {"database": False}
    return {"database": True, "schema": {"ok": False, "problem": problem} if problem else True}
