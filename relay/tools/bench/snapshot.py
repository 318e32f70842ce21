"""The floor of the relay's design: the outbox read in place by snapshot windows, bare.

One session takes every committed row once, window after window, and does
nothing else: no validation, no rendering, no subscribers, no followers. The
relay (relay/recorder.py, relay/log/) does the same reads and more; this
floor bounds what it can reach on the same machine in the same run. Nothing
here is used by ``relay run``; the SQL is ``relay/sql/bench.sql``.
"""

from __future__ import annotations

from typing import Any

import psycopg

from relay.sql import query

__all__ = ["WindowReader", "install"]

_NOTHING_VISIBLE = "1:1:"  # the snapshot before any transaction


def install(conn: psycopg.Connection[Any]) -> None:
    """Give a (bench) database the floor's own window table (the outbox has its ``xid``)."""
    conn.execute(query("bench_snapshot_install"))


class WindowReader:
    """Reads each committed outbox row exactly once, window after window.

    ``read`` returns the next page of the open window, or opens a new window
    (one durable row) when the last one is exhausted; an empty list means the
    window just opened held nothing new. Rows are
    ``(xid_text, id, event_id, event_type, restaurant_id, order_id, payload)``
    with the payload decoded.
    """

    def __init__(self, conn: psycopg.Connection[Any], page: int = 500) -> None:
        self._conn = conn
        self._page = page
        self._window = 0
        self._previous = _NOTHING_VISIBLE
        self._current: str | None = None
        self._after: tuple[str, int] = ("0", 0)

    @property
    def windows(self) -> int:
        return self._window

    def read(self) -> list[tuple[Any, ...]]:
        fresh = self._current is None
        if self._current is None:
            self._window += 1
            row = self._conn.execute(
                query("bench_snapshot_open_window"), {"window_id": self._window}
            ).fetchone()
            assert row is not None
            self._current = str(row[0])
        rows = self._conn.execute(
            query("bench_snapshot_read"),
            {
                "previous": self._previous,
                "current": self._current,
                "after_xid": self._after[0],
                "after_id": self._after[1],
                "limit": self._page,
            },
        ).fetchall()
        if rows:
            self._after = (rows[-1][0], int(rows[-1][1]))
        if len(rows) < self._page:
            # Exhausted: the next read opens the next window, from its start
            # (a transaction that committed late has a smaller xid than rows
            # already read, and belongs to a later window).
            self._previous, self._current = self._current, None
            self._after = ("0", 0)
        if not rows and not fresh:
            return self.read()  # the page boundary fell on the window's end
        return rows
