"""The one reconnect loop every long-lived session runs in (``hold_session``),
against a real server: a session killed under its work is replaced, said once,
and the work goes on on the new connection; a bug is not retried."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest

from relay.sessions import hold_session

log = logging.getLogger("relay.test.sessions")


async def test_a_killed_session_is_replaced_and_said_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    backends: list[int] = []

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        backends.append(conn.info.backend_pid)
        if len(backends) < 3:
            # The server ends the session under the work, as an administrator
            # or a failover would.
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        stop.set()

    with caplog.at_level(logging.WARNING, logger=log.name):
        await asyncio.wait_for(
            hold_session(database_url, stop, work, label="probe", logger=log, pause=0.05), 30
        )
    assert len(backends) == 3 and len(set(backends)) == 3  # a new session each time
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert len(lost) == 2 and all(m.startswith("probe: ") for m in lost)


async def test_a_bug_in_the_work_is_not_retried(database_url: str) -> None:
    calls = 0

    async def work(_conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await hold_session(database_url, asyncio.Event(), work, label="probe", logger=log)
    assert calls == 1


async def test_stop_ends_the_loop_while_the_database_is_unreachable() -> None:
    stop = asyncio.Event()

    async def never(_conn: psycopg.AsyncConnection[Any]) -> None:
        raise AssertionError("no connection can be made")

    loop = asyncio.get_running_loop()
    loop.call_later(0.5, stop.set)
    await asyncio.wait_for(
        hold_session("postgresql://nobody@127.0.0.1:1/none", stop, never, label="probe",
                     logger=log),
        10,
    )  # fmt: skip
