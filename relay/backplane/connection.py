"""One NATS connection for either side of the backplane, and its stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.js.errors
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from relay.backplane.codec import BackplaneConfig
from relay.db import sleep_or_stop

__all__ = ["hold_nats"]

log = logging.getLogger("relay.backplane")

_DUPLICATE_WINDOW = 30.0  # seconds: a takeover re-publishes what the last check did, at most


async def _quiet(_error: Exception) -> None:
    return None


async def connect(config: BackplaneConfig, lost: asyncio.Event, *, timeout: float = 5.0) -> Any:
    """A connection that reconnects never: its owner does, and says so once."""

    async def on_disconnect() -> None:
        lost.set()

    return await nats.connect(
        config.url,
        connect_timeout=timeout,
        allow_reconnect=False,
        # nats-py retries a first connection forever with 0: with 1, an
        # unreachable server fails the connect after a second try.
        max_reconnect_attempts=1,
        reconnect_time_wait=0.2,
        error_cb=_quiet,
        disconnected_cb=on_disconnect,
        closed_cb=on_disconnect,
    )


async def ensure_stream(js: Any, config: BackplaneConfig) -> None:
    """The backplane's stream, created if missing (a NATS restarted without its
    store loses it): bounded by age, oldest messages dropped first."""
    try:
        await js.stream_info(config.stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(
                StreamConfig(
                    name=config.stream,
                    subjects=[config.subject],
                    storage=StorageType.FILE,
                    max_age=config.max_age,
                    discard=DiscardPolicy.OLD,
                    duplicate_window=min(_DUPLICATE_WINDOW, config.max_age),
                )
            )
        except nats.js.errors.BadRequestError as exc:
            # Another replica may have created it in between; if not, say why
            # JetStream refused (a subject another stream already takes).
            try:
                await js.stream_info(config.stream)
            except nats.js.errors.NotFoundError:
                raise RuntimeError(
                    f"JetStream refused to create stream {config.stream} on "
                    f"{config.subject}: {exc.description}"
                ) from None


Work = Callable[[Any, Any, asyncio.Event], Awaitable[None]]


async def hold_nats(
    config: BackplaneConfig,
    stop: asyncio.Event,
    work: Work,
    *,
    label: str,
    on_lost: Callable[[str], None],
) -> None:
    """Run ``work(connection, jetstream, ended)`` until ``stop``; when NATS goes
    away, say so once (``on_lost`` and one log line), back off, reconnect and
    run it again. ``work`` returns once ``ended`` is set: the connection was
    lost, or ``stop`` was set."""
    delay = 0.2
    down_since: float | None = None
    while not stop.is_set():
        lost = asyncio.Event()
        nc: Any = None
        stopping = asyncio.ensure_future(_relay_stop(stop, lost))
        try:
            nc = await connect(config, lost)
            js = nc.jetstream(timeout=5.0)
            await ensure_stream(js, config)
            if down_since is not None:
                log.info("%s: backplane %s reachable again after %.1f s",
                         label, config.name, time.monotonic() - down_since)  # fmt: skip
                down_since = None
            delay = 0.2
            await work(nc, js, lost)
            reason = "connection lost" if lost.is_set() and not stop.is_set() else ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any NATS failure: the database serves meanwhile
            reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        finally:
            stopping.cancel()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)
        if stop.is_set():
            return
        if reason:
            on_lost(reason)
            if down_since is None:
                down_since = time.monotonic()
                log.warning("%s: backplane %s unavailable (%s); the database serves meanwhile",
                            label, config.name, reason)  # fmt: skip
        await sleep_or_stop(stop, delay)
        delay = min(delay * 2, 5.0)


async def _relay_stop(stop: asyncio.Event, ended: asyncio.Event) -> None:
    await stop.wait()
    ended.set()
