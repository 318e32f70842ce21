"""Connecting to PostgreSQL with errors a person can act on.

Driver errors are mapped here, at the boundary, to ``DatabaseUnavailable``
whose message names host, port and database but never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg
import tenacity
from psycopg.conninfo import conninfo_to_dict

from relay.errors import ConfigError, DatabaseUnavailable

__all__ = [
    "aconnect",
    "aconnect_retrying",
    "connect",
    "describe",
    "prepare_session",
    "redact",
    "role_params",
    "sleep_or_stop",
]


def _params(database_url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(database_url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"DATABASE_URL is not a valid libpq URL: {_first_line(exc)}") from None


def describe(database_url: str) -> str:
    """``user@host:port/dbname`` for messages: everything but the password."""
    params = _params(database_url)
    host = str(params.get("host") or "localhost")
    if host.startswith("/"):
        host = f"socket {host}"
    port = params.get("port") or 5432
    user = params.get("user") or "(default user)"
    dbname = params.get("dbname") or "(default database)"
    return f"{user}@{host}:{port}/{dbname}"


def redact(text: str, database_url: str) -> str:
    """Remove the URL's password from a message that might quote it."""
    password = conninfo_to_dict(database_url).get("password")
    return text.replace(str(password), "***") if password else text


def _unavailable(database_url: str, exc: Exception) -> DatabaseUnavailable:
    reason = redact(_first_line(exc), database_url)
    return DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {describe(database_url)}: {reason}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SESSION_SETTINGS = b"SET jit = off; SET TimeZone = 'UTC'; SET plan_cache_mode = force_generic_plan"


def connect(
    database_url: str, *, autocommit: bool = False, connect_timeout: int = 5, **kwargs: Any
) -> psycopg.Connection[Any]:
    """A sync connection, or ``DatabaseUnavailable`` naming where it tried
    (set up like every relay session, see ``prepare_session``)."""
    describe(database_url)  # validates the URL first, with its own message
    try:
        conn = psycopg.connect(
            database_url, autocommit=autocommit, connect_timeout=connect_timeout, **kwargs
        )
    except psycopg.OperationalError as exc:
        raise _unavailable(database_url, exc) from None
    conn.execute(_SESSION_SETTINGS)
    if not autocommit:
        conn.commit()
    return conn


def role_params(database_url: str, role: str) -> dict[str, Any]:
    """Connection parameters naming a relay session in ``pg_stat_activity``
    (``relay dispatcher``), so a DBA sees what each one is, unless the URL
    already sets application_name."""
    if "application_name" in _params(database_url):
        return {}
    return {"application_name": f"relay {role}"[:63]}


async def prepare_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """Session settings for every relay connection (also the gateway's pool).

    JIT off: the relay's queries are short index lookups whose planner costs can
    look high on small, unanalysed tables; JIT-compiling them added ~12 ms to a
    0.2 ms claim. Generic plans for prepared statements: planned with the
    values on statistics that have not seen a burst yet, a page of one big
    transaction's window was a bitmap scan that fetched and sorted every
    remaining row of it, for every page (quadratic); the generic plan is the
    ordered index range that stops at the page (reads that need their values
    to plan well are not prepared). TimeZone UTC: times load the same whatever the server's
    default, and 9999-12-31 23:59 UTC stays loadable (east of UTC it is year 10000).
    """
    await conn.execute(_SESSION_SETTINGS)
    if not conn.autocommit:
        await conn.commit()


async def aconnect(
    database_url: str,
    *,
    autocommit: bool = False,
    connect_timeout: int = 5,
    role: str | None = None,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """An async connection, or ``DatabaseUnavailable`` naming where it tried.

    With a ``role``, a relay session: named, and set up by ``prepare_session``.
    """
    _params(database_url)  # a malformed URL is a ConfigError, not a retry
    if role:
        kwargs = {**role_params(database_url, role), **kwargs}
    try:
        conn = await psycopg.AsyncConnection.connect(
            database_url, autocommit=autocommit, connect_timeout=connect_timeout, **kwargs
        )
        if role:
            await prepare_session(conn)
        return conn
    except psycopg.OperationalError as exc:
        raise _unavailable(database_url, exc) from None


_TRANSIENT = (psycopg.OperationalError, DatabaseUnavailable, OSError)


async def aconnect_retrying(
    database_url: str,
    stop: asyncio.Event,
    *,
    label: str,
    logger: logging.Logger,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any] | None:
    """Connect, retrying with exponential back-off and jitter until ``stop``.

    Logs one warning when an outage begins and one line when it ends, never a
    traceback per attempt. Returns None when stopped first.
    """
    started = time.monotonic()
    failures = 0
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(_TRANSIENT),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5),
        stop=lambda _state: stop.is_set(),
        sleep=lambda seconds: sleep_or_stop(stop, seconds),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return None
                try:
                    conn = await aconnect(database_url, role=label, **kwargs)
                except _TRANSIENT as exc:
                    failures += 1
                    if failures == 1:
                        logger.warning(
                            "%s: database unavailable (%s); retrying with backoff",
                            label, _first_line(exc),
                        )  # fmt: skip
                    raise
                if failures:
                    logger.info(
                        "%s: database reachable again after %.1f s",
                        label, time.monotonic() - started,
                    )  # fmt: skip
                return conn
    except _TRANSIENT:
        return None
    return None


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set first (every retry loop waits so)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
