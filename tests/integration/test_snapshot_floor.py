"""The bench's snapshot floor, the relay's design bare (relay/tools/bench/snapshot.py).

Its figures only mean something if its reader is correct: every committed row
exactly once, in an order no late commit can break, rolled-back rows never.
"""

from __future__ import annotations

import dataclasses
import uuid

import psycopg

from relay.outbox import enqueue
from relay.tools.bench.snapshot import WindowReader, install
from tests.helpers.orders import event


def _numbers(rows: list[tuple[object, ...]]) -> list[str]:
    return [row[6]["orderNumber"] for row in rows]  # type: ignore[index]


def _insert(conn: psycopg.Connection[object], number: str) -> None:
    item = event("OrderAccepted", restaurant_id=uuid.uuid4())
    enqueue(conn, dataclasses.replace(item, payload={**item.payload, "orderNumber": number}))


def test_windows_give_each_committed_row_once_and_late_commits_later(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as reader_conn,
        psycopg.connect(database_url) as slow,
        psycopg.connect(database_url) as fast,
    ):
        install(reader_conn)
        reader = WindowReader(reader_conn, page=2)  # pages end inside and at a window's end
        _insert(slow, "slow")  # an older transaction, still open
        for n in range(3):
            _insert(fast, f"fast-{n}")
        fast.commit()
        with psycopg.connect(database_url) as doomed:
            _insert(doomed, "rolled-back")
            doomed.rollback()

        first: list[tuple[object, ...]] = []
        while rows := reader.read():
            first += rows
        assert _numbers(first) == ["fast-0", "fast-1", "fast-2"]  # not the open one

        slow.commit()  # commits after rows inserted later were read
        _insert(fast, "after")
        fast.commit()
        second: list[tuple[object, ...]] = []
        while rows := reader.read():
            second += rows
        # The late commit is not skipped (its xid is below the cursor), and
        # nothing is read twice; transactions in xid order.
        assert _numbers(second) == ["slow", "after"]
        assert reader.read() == []
        windows = reader_conn.execute("SELECT count(*) FROM bench_windows").fetchone()
        assert windows == (reader.windows,)
