"""The read path alone: the relay's reads of the log against a bare fetch of
the same rows, in this process, on one recorded window.

Validation and rendering are about half of the relay's CPU on a drain, but
the drain's figures mix them with the gateway, the SLA watcher and a shared
machine's noise. Here both readers run in one process, one after the other,
``rounds`` times, on the same window: their ratio is what validating and
rendering cost over reading, measured in one run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg

from relay import log as event_log
from relay.log import Position
from relay.log.rows import COLUMNS

__all__ = ["measure"]

_PAGE = 1000
# The same columns as every read of the log, in pages by insert order: what a
# reader costs before it validates and renders.
_BARE = b"SELECT 0, " + COLUMNS + b" FROM relay_outbox AS o WHERE o.id > %s ORDER BY o.id LIMIT %s"


async def _session(url: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute("SET TimeZone = 'UTC'")  # as the relay's own sessions
    return conn


async def _relay_read(url: str, window: int) -> tuple[int, float]:
    """Events read, and this process's CPU seconds, for ``relay.log.read`` of the window."""
    conn = await _session(url)
    try:
        after, end, events = Position.end_of(window - 1), Position.end_of(window), 0
        began = time.process_time()
        while after < end:
            page = await event_log.read(conn, after, window, limit=_PAGE)
            events += len(page.events)
            after = page.reached
        return events, time.process_time() - began
    finally:
        await conn.close()


async def _bare_read(url: str) -> tuple[int, float]:
    """Rows read, and this process's CPU seconds, for the bare fetch with the payload decoded."""
    conn = await _session(url)
    try:
        last, rows = 0, 0
        began = time.process_time()
        while True:
            cur = await conn.execute(_BARE, (last, _PAGE))
            page = await cur.fetchall()
            if not page:
                return rows, time.process_time() - began
            for row in page:
                json.loads(row[9])
            rows += len(page)
            last = page[-1][2]
    finally:
        await conn.close()


def measure(url: str, window: int, rounds: int) -> dict[str, Any]:
    """Per event, this process's CPU for each reader (the best of ``rounds``,
    interleaved), and ``ratio``: the bare fetch's over the relay's."""
    relay: list[float] = []
    bare: list[float] = []
    events = rows = 0
    for _ in range(rounds):
        events, seconds = asyncio.run(_relay_read(url, window))
        relay.append(1e6 * seconds / max(events, 1))
        rows, seconds = asyncio.run(_bare_read(url))
        bare.append(1e6 * seconds / max(rows, 1))
    if events != rows:
        raise RuntimeError(f"the relay read {events} events of the window's {rows} rows")
    return {
        "events": events,
        "rounds": rounds,
        "relay_us_per_event": round(min(relay), 2),
        "bare_us_per_event": round(min(bare), 2),
        "ratio": round(min(bare) / min(relay), 3),
        "relay_us_per_event_per_round": [round(v, 2) for v in relay],
        "bare_us_per_event_per_round": [round(v, 2) for v in bare],
    }
