"""The log's correctness: snapshot windows over the outbox, read with ``relay.log.read``.

Whatever the interleaving of producer commits, window records and reads,
every committed row is read exactly once, in (window, xid, id) order, and
a cursor already handed to a client is never passed by a later commit.
Windows are recorded here with the recorder's own query (``record_window``).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from relay import log as event_log
from relay.db import aconnect
from relay.errors import LogPruned
from relay.log import ORIGIN, LogEvent, Position, Rejected, Selector, notify
from relay.log.reads import _RECORD_AND_READ, _RECORD_IF_DUE, _selected  # as they run
from relay.outbox import OutboxEvent, enqueue
from relay.sql import query
from tests.helpers.orders import CHAIN, INSERT_SQL, event, payload

EVERYTHING = Selector()


def record(conn: psycopg.Connection[Any]) -> int:
    """Close the next window as the recorder does; ``conn`` is in autocommit."""
    row = conn.execute(query("record_window")).fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def recording(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


async def reader(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def read_through(
    conn: psycopg.AsyncConnection[Any],
    through: int,
    *,
    after: Position = ORIGIN,
    selector: Selector = EVERYTHING,
    limit: int = 5,
) -> tuple[list[LogEvent], list[Rejected]]:
    """Every row after ``after`` up to the end of window ``through``, page by
    page as a stream does, checking what each page promises on the way."""
    events: list[LogEvent] = []
    rejected: list[Rejected] = []
    while after < Position.end_of(through):
        page = await event_log.read(conn, after, through, selector=selector, limit=limit)
        assert page.after == after
        assert page.reached > after, "a read must make progress"
        assert page.reached <= Position.end_of(through)
        assert page.rows == len(page.events) + len(page.rejected) <= limit
        ats = [e.at for e in page.events] + [r.at for r in page.rejected]
        assert all(after < at <= page.reached for at in ats)
        events += page.events
        rejected += page.rejected
        after = page.reached
    return events, rejected


def truth(url: str) -> list[tuple[Position, uuid.UUID]]:
    """Each windowed row's position by the definition: the first window whose
    snapshot sees its transaction, then its transaction and insert order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT w.window_id, o.xid::text::bigint, o.id, o.event_id
            FROM relay_outbox AS o
            CROSS JOIN LATERAL (
                SELECT min(window_id) AS window_id FROM relay_windows AS w
                WHERE pg_visible_in_snapshot(o.xid, w.snapshot)
            ) AS w
            WHERE w.window_id IS NOT NULL
            ORDER BY 1, 2, 3
            """
        ).fetchall()
    return [(Position(int(w), int(x), int(i)), e) for w, x, i, e in rows]


def positions(events: list[LogEvent]) -> list[tuple[Position, uuid.UUID]]:
    return [(e.at, uuid.UUID(e.event_id)) for e in events]


def assert_log_order(events: list[LogEvent]) -> None:
    ats = [e.at for e in events]
    assert ats == sorted(ats) and len(set(ats)) == len(ats)
    ids = [e.event_id for e in events]
    assert len(set(ids)) == len(ids), "an event was read twice"


def late_commits(events: list[LogEvent]) -> int:
    """Events of a transaction that started before one of an earlier window."""
    late, newest = 0, -1
    for window in sorted({e.at.window for e in events}):
        xids = [e.at.xid for e in events if e.at.window == window]
        late += sum(x < newest for x in xids)
        newest = max(newest, *xids)
    return late


def selected(events: list[LogEvent], selector: Selector) -> list[LogEvent]:
    """What a selector must return, from the whole log."""
    if selector.order is not None:
        restaurant, order = map(str, selector.order)
        return [e for e in events if e.restaurant_id == restaurant and e.order_id == order]
    if selector.customer is not None:
        customer = str(selector.customer)
        return [e for e in events if e.customer_id == customer and e.order_id is not None]
    if selector.restaurants:
        restaurants = {str(r) for r in selector.restaurants}
        return [e for e in events if e.restaurant_id in restaurants]
    return events


def selectors(events: list[LogEvent]) -> list[Selector]:
    """Every kind of selector over the restaurants, orders and customers in ``events``."""
    restaurants = sorted({uuid.UUID(e.restaurant_id) for e in events}, key=str)
    customers = sorted({uuid.UUID(e.customer_id) for e in events if e.customer_id}, key=str)
    orders = sorted(
        {(uuid.UUID(e.restaurant_id), uuid.UUID(e.order_id)) for e in events if e.order_id},
        key=str,
    )
    found = [EVERYTHING, Selector(restaurants=(restaurants[0],))]
    if len(restaurants) > 1:
        found.append(Selector(restaurants=tuple(restaurants[:2])))
    found += [Selector(order=(r, o)) for r, o in orders[:2] if o is not None]
    found += [Selector(customer=c) for c in customers[:2]]
    return found


async def test_concurrent_producers_are_read_once_in_log_order(database_url: str) -> None:
    """Producers commit in every interleaving while windows are recorded and a
    stream tails the log: the tail and every later read (small pages, each
    selector) hold each committed row exactly once, at its defined position."""
    restaurants = [uuid.uuid4() for _ in range(3)]
    customers: list[uuid.UUID | None] = [uuid.uuid4(), uuid.uuid4(), None]
    committed: set[uuid.UUID] = set()
    rolled_back: set[uuid.UUID] = set()
    lock = threading.Lock()
    failures: list[BaseException] = []
    done = threading.Event()

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(database_url) as conn:
                for _ in range(15):
                    restaurant, order = rng.choice(restaurants), uuid.uuid4()
                    customer = rng.choice(customers)
                    batch = [
                        event(kind, restaurant_id=restaurant, order_id=order, customer_id=customer)
                        for kind in CHAIN[: rng.randint(1, 4)]
                    ]
                    for item in batch:
                        enqueue(conn, item)
                        time.sleep(rng.random() * 0.004)
                    ids = {item.event_id for item in batch}
                    if rng.random() < 0.15:
                        conn.rollback()
                        with lock:
                            rolled_back.update(ids)
                    else:
                        conn.commit()
                        with lock:
                            committed.update(ids)
        except BaseException as exc:
            failures.append(exc)

    def record_windows() -> None:
        try:
            with recording(database_url) as conn:
                while not done.is_set():
                    record(conn)
                    time.sleep(0.003)
        except BaseException as exc:
            failures.append(exc)

    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(6)]
    recorder = threading.Thread(target=record_windows)
    recorder.start()
    for thread in producers:
        thread.start()
    tail: list[LogEvent] = []
    cursor = ORIGIN
    conn = await reader(database_url)
    rng = random.Random(7)
    try:
        while any(t.is_alive() for t in producers):
            newest = (await event_log.head(conn)).window
            got, rejected = await read_through(conn, newest, after=cursor, limit=rng.randint(3, 7))
            assert not rejected
            tail += got
            cursor = max(cursor, Position.end_of(newest))
            await asyncio.sleep(0.01)
        done.set()
        recorder.join()
        assert not failures, failures
        with recording(database_url) as rec:
            last = record(rec)
        got, _ = await read_through(conn, last, after=cursor)
        tail += got

        assert_log_order(tail)
        assert {uuid.UUID(e.event_id) for e in tail} == committed
        assert not committed & rolled_back
        assert positions(tail) == truth(database_url)
        assert len({e.at.window for e in tail}) > 5, "the test must span many windows"
        assert late_commits(tail) > 0, "the test must see transactions commit out of xid order"
        for selector in selectors(tail):
            for limit in (3, 4, 5, 6, 7):
                events, _ = await read_through(conn, last, selector=selector, limit=limit)
                assert positions(events) == positions(selected(tail, selector)), (selector, limit)
    finally:
        done.set()
        await conn.close()


async def test_a_window_read_as_it_is_recorded_holds_what_a_later_read_does(
    database_url: str,
) -> None:
    """The recorder reads a new window's first page in the statement that
    records it: with producers committing out of xid order and rolling back
    around it, those pages and the reads that finish each window hold every
    committed row once, at the position the definition gives it."""
    restaurant = uuid.uuid4()
    committed: set[uuid.UUID] = set()
    failures: list[BaseException] = []
    lock = threading.Lock()

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(database_url) as conn:
                for _ in range(25):
                    ids = [enqueue_one(conn, restaurant) for _ in range(rng.randint(1, 3))]
                    time.sleep(rng.random() * 0.006)  # others start and commit meanwhile
                    if rng.random() < 0.2:
                        conn.rollback()
                        continue
                    conn.commit()
                    with lock:
                        committed.update(ids)
        except BaseException as exc:
            failures.append(exc)

    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(4)]
    conn = await reader(database_url)
    newest = (await event_log.head(conn)).window
    tail: list[LogEvent] = []
    first_pages = 0
    try:
        for thread in producers:
            thread.start()
        while True:
            running = any(t.is_alive() for t in producers)
            turn = await event_log.record_window_if_due(conn, read_after=newest, limit=3)
            if turn.recorded is not None:
                page = turn.page
                assert page is not None and page.after == Position.end_of(newest)
                assert page.rows == len(page.events) <= 3 and page.reached > page.after
                first_pages += 1
                tail += page.events
                newest = turn.recorded
                rest, _ = await read_through(conn, newest, after=page.reached)
                tail += rest
            elif not running:
                break
            await asyncio.sleep(0.002)
        assert not failures, failures
        assert_log_order(tail)
        assert {uuid.UUID(e.event_id) for e in tail} == committed
        assert positions(tail) == truth(database_url)
        assert first_pages > 5, "the test must span many windows"
        assert late_commits(tail) > 0, "the test must see transactions commit out of xid order"
    finally:
        await conn.close()


async def test_a_window_is_not_read_against_a_window_that_is_not_the_newest(
    database_url: str,
) -> None:
    """If another window was recorded since the one the caller read to its
    end, the statement still records the next, but reads nothing: the page
    would be relative to the wrong snapshot."""
    conn = await reader(database_url)
    try:
        stale = (await event_log.head(conn)).window
        with recording(database_url) as rec:
            with rec.transaction():
                enqueue_one(rec, uuid.uuid4())
            record(rec)
            with rec.transaction():
                enqueue_one(rec, uuid.uuid4())
        turn = await event_log.record_window_if_due(conn, read_after=stale)
        assert turn.recorded == stale + 2 == turn.newest
        assert turn.page is None
        events, _ = await read_through(conn, turn.recorded, after=Position.end_of(stale))
        assert [e.at.window for e in events] == [stale + 1, stale + 2]
    finally:
        await conn.close()


@pytest.mark.parametrize("seed", [1, 3, 4, 5])
async def test_random_interleavings_never_skip_or_repeat(database_url: str, seed: int) -> None:
    """Open, write, commit and roll back transactions on several sessions in a
    random order, recording windows and tailing the log in between: the
    tailing reader ends with exactly the committed rows, each once, in the
    same order as a fresh read of the whole log."""
    rng = random.Random(seed)
    restaurants = [uuid.uuid4() for _ in range(2)]
    sessions = [psycopg.connect(database_url) for _ in range(4)]
    pending: list[list[uuid.UUID]] = [[] for _ in sessions]
    committed: list[uuid.UUID] = []
    conn = await reader(database_url)
    tail: list[LogEvent] = []
    cursor = ORIGIN
    try:
        with recording(database_url) as rec:
            for _ in range(150):
                i = rng.randrange(len(sessions))
                action = rng.random()
                if action < 0.45:
                    item = event("OrderAccepted", restaurant_id=rng.choice(restaurants))
                    enqueue(sessions[i], item)
                    pending[i].append(item.event_id)
                elif action < 0.65:
                    sessions[i].commit()
                    committed += pending[i]
                    pending[i] = []
                elif action < 0.72:
                    sessions[i].rollback()
                    pending[i] = []
                elif action < 0.88:
                    record(rec)
                else:
                    newest = (await event_log.head(conn)).window
                    got, _ = await read_through(conn, newest, after=cursor, limit=rng.randint(3, 7))
                    tail += got
                    cursor = Position.end_of(newest)
            for i, session in enumerate(sessions):
                session.commit()
                committed += pending[i]
            last = record(rec)
        got, _ = await read_through(conn, last, after=cursor)
        tail += got
        whole, _ = await read_through(conn, last, limit=rng.randint(3, 7))
        assert positions(tail) == positions(whole) == truth(database_url)
        assert sorted(uuid.UUID(e.event_id) for e in tail) == sorted(committed)
        assert_log_order(tail)
        assert late_commits(tail) > 0, "the schedule must commit out of xid order"
    finally:
        for session in sessions:
            session.close()
        await conn.close()


async def test_a_late_commit_lands_in_a_later_window_past_every_cursor(
    database_url: str,
) -> None:
    """T1 inserts first and commits after T2 and after T2's window was recorded:
    a stream that has already passed T2 still receives T1, after its cursor."""
    restaurant = uuid.uuid4()
    conn = await reader(database_url)
    slow = psycopg.connect(database_url)
    try:
        with recording(database_url) as rec:
            early = event("OrderAccepted", restaurant_id=restaurant)
            enqueue(slow, early)  # T1: the smaller xid and id, not committed
            later = event("OrderPreparing", restaurant_id=restaurant)
            with psycopg.connect(database_url) as fast:
                enqueue(fast, later)  # T2 commits
            first = record(rec)
            seen, _ = await read_through(conn, first)
            assert [uuid.UUID(e.event_id) for e in seen] == [later.event_id]
            cursors = [seen[-1].at, Position.end_of(first)]
            slow.commit()
            second = record(rec)
        for selector in (EVERYTHING, Selector(restaurants=(restaurant,))):
            for cursor in cursors:
                late, _ = await read_through(conn, second, after=cursor, selector=selector)
                assert [uuid.UUID(e.event_id) for e in late] == [early.event_id]
                assert late[0].at > cursor and late[0].at.window == second > first
        # It did start and insert first: log order is commit order, not insert order.
        whole, _ = await read_through(conn, second)
        assert [uuid.UUID(e.event_id) for e in whole] == [later.event_id, early.event_id]
        assert whole[1].at.xid < whole[0].at.xid and whole[1].at.id < whole[0].at.id
    finally:
        slow.close()
        await conn.close()


@pytest.mark.parametrize("windows_between", [False, True])
async def test_a_transaction_started_after_a_commit_has_larger_positions(
    database_url: str, windows_between: bool
) -> None:
    """Causal order: what a producer writes after seeing another's commit comes
    later in the log, in the same window or in a later one."""
    restaurant = uuid.uuid4()
    written: list[OutboxEvent] = []
    with recording(database_url) as rec:
        for i in range(6):
            with psycopg.connect(database_url) as producer:  # each on a new session
                item = event(CHAIN[i % 4], restaurant_id=restaurant)
                enqueue(producer, item)
                if i % 2:
                    enqueue(producer, event(CHAIN[i % 4], restaurant_id=uuid.uuid4()))
            written.append(item)
            if windows_between:
                record(rec)
        last = record(rec)
    conn = await reader(database_url)
    try:
        for selector in (EVERYTHING, Selector(restaurants=(restaurant,))):
            events, _ = await read_through(conn, last, selector=selector, limit=3)
            mine = [e for e in events if e.restaurant_id == str(restaurant)]
            assert [uuid.UUID(e.event_id) for e in mine] == [w.event_id for w in written]
            assert_log_order(mine)
        windows = {e.at.window for e in mine}
        assert len(windows) == (6 if windows_between else 1)
    finally:
        await conn.close()


async def test_a_long_running_transaction_stalls_nobody(database_url: str) -> None:
    """While a producer's transaction stays open, others' rows are windowed and
    read as usual; its own rows come in the first window after its commit."""
    restaurant = uuid.uuid4()
    conn = await reader(database_url)
    long = psycopg.connect(database_url)
    try:
        stuck = event("OrderAccepted", restaurant_id=restaurant)
        enqueue(long, stuck)
        cursor = ORIGIN
        with recording(database_url) as rec:
            for _ in range(4):
                batch = [event("OrderPreparing", restaurant_id=restaurant) for _ in range(3)]
                with psycopg.connect(database_url) as producer:
                    for item in batch:
                        enqueue(producer, item)
                window = record(rec)
                got, _ = await read_through(conn, window, after=cursor, limit=2)
                assert [uuid.UUID(e.event_id) for e in got] == [b.event_id for b in batch]
                assert {e.at.window for e in got} == {window}
                cursor = Position.end_of(window)
            long.commit()
            window = record(rec)
        got, _ = await read_through(conn, window, after=cursor)
        assert [(e.event_id, e.at.window) for e in got] == [(str(stuck.event_id), window)]
        assert positions((await read_through(conn, window))[0]) == truth(database_url)
    finally:
        long.close()
        await conn.close()


async def test_rolled_back_rows_never_appear(database_url: str) -> None:
    """Neither a rolled-back transaction (even one open across a window) nor a
    rolled-back savepoint leaves anything in the log."""
    restaurant = uuid.uuid4()
    kept: list[uuid.UUID] = []
    with recording(database_url) as rec:
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
            conn.rollback()
            kept.append(enqueue_one(conn, restaurant))
        across = psycopg.connect(database_url)
        enqueue(across, event("OrderAccepted", restaurant_id=restaurant))
        record(rec)
        across.rollback()
        across.close()
        with psycopg.connect(database_url) as conn, conn.transaction():
            kept.append(enqueue_one(conn, restaurant))
            with pytest.raises(RuntimeError), conn.transaction():  # a savepoint
                enqueue(conn, event("OrderRejected", restaurant_id=restaurant))
                raise RuntimeError("the order service gives up on this step")
            with conn.transaction():  # a released savepoint: its rows are kept
                kept.append(enqueue_one(conn, restaurant))
        last = record(rec)
    conn_a = await reader(database_url)
    try:
        events, rejected = await read_through(conn_a, last, limit=3)
    finally:
        await conn_a.close()
    assert [uuid.UUID(e.event_id) for e in events] == kept and not rejected
    assert positions(events) == truth(database_url)


def enqueue_one(conn: psycopg.Connection[Any], restaurant: uuid.UUID) -> uuid.UUID:
    item = event("OrderPreparing", restaurant_id=restaurant)
    enqueue(conn, item)
    return item.event_id


async def test_two_readers_see_identical_positions_and_bytes(database_url: str) -> None:
    restaurants = [uuid.uuid4() for _ in range(3)]
    with recording(database_url) as rec:
        for i in range(12):
            with psycopg.connect(database_url) as producer:
                for kind in CHAIN[: 1 + i % 4]:
                    enqueue(producer, event(kind, restaurant_id=restaurants[i % 3],
                                            customer_id=uuid.uuid4()))  # fmt: skip
            if i % 3 == 0:
                record(rec)
        last = record(rec)
    one, two = await reader(database_url), await reader(database_url)
    try:
        a, _ = await read_through(one, last, limit=3)
        b, _ = await read_through(two, last, limit=7)
        c, _ = await read_through(two, last, limit=1000)
    finally:
        await one.close()
        await two.close()
    assert len(a) == (1 + 2 + 3 + 4) * 3
    assert a == b == c  # every field: position, SSE name, channels, data, ids, times
    assert all(e.data.encode() == f.data.encode() for e, f in zip(a, b, strict=True))


async def test_rejected_rows_are_skipped_by_every_read_and_later_rows_flow(
    database_url: str,
) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    good = [event("OrderAccepted", restaurant_id=restaurant, order_id=order) for _ in range(3)]
    unknown, bad, endless = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    wrong_status = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
    wrong_status["newStatus"] = "Delivered"
    fine = json.dumps(payload("OrderPreparing", restaurant_id=restaurant, order_id=order))
    with recording(database_url) as rec:
        with psycopg.connect(database_url) as conn:
            enqueue(conn, good[0])
            conn.execute(INSERT_SQL, (unknown, "OrderTeleported", restaurant, order, None, fine))
            conn.execute(INSERT_SQL, (bad, "OrderPreparing", restaurant, order, None,
                                      json.dumps(wrong_status)))  # fmt: skip
            conn.execute(
                "INSERT INTO relay_outbox (event_id, event_type, restaurant_id, order_id,"
                " payload, occurred_on_utc) VALUES (%s, 'OrderPreparing', %s, %s, %s, '-infinity')",
                (endless, restaurant, order, fine),
            )
            enqueue(conn, good[1])
        first = record(rec)
        with psycopg.connect(database_url) as conn:
            enqueue(conn, good[2])
        second = record(rec)
    conn_a = await reader(database_url)
    try:
        for selector in (EVERYTHING, Selector(order=(restaurant, order))):
            for limit in (1, 2, 3, 7):
                events, rejected = await read_through(conn_a, first, selector=selector, limit=limit)
                assert [uuid.UUID(e.event_id) for e in events] == [
                    good[0].event_id,
                    good[1].event_id,
                ]
                assert [uuid.UUID(r.event_id) for r in rejected] == [unknown, bad, endless]
                ats = sorted([*(e.at for e in events), *(r.at for r in rejected)])
                assert ats == [events[0].at, *(r.at for r in rejected), events[1].at]
                more, none = await read_through(
                    conn_a, second, after=Position.end_of(first), selector=selector
                )
                assert [uuid.UUID(e.event_id) for e in more] == [good[2].event_id] and not none
    finally:
        await conn_a.close()
    reasons = [r.reason for r in rejected]
    assert "OrderTeleported" in reasons[0]
    assert "newStatus" in reasons[1]
    assert "occurred_on_utc" in reasons[2] and "-infinity" in reasons[2]
    assert all(r.at.window == first for r in rejected)
    assert [r.event_type for r in rejected] == [
        "OrderTeleported",
        "OrderPreparing",
        "OrderPreparing",
    ]


async def test_pages_inside_one_big_window_are_exact(database_url: str) -> None:
    """One window of 60 rows (one big transaction and a few small ones), read
    a few rows at a time: every row once, in order, ``reached`` within the
    window between pages."""
    restaurants = [uuid.uuid4(), uuid.uuid4()]
    with recording(database_url) as rec:
        with psycopg.connect(database_url) as conn:
            for i in range(50):
                enqueue(conn, event("OrderAccepted", restaurant_id=restaurants[i % 2]))
        for i in range(5):
            with psycopg.connect(database_url) as conn:
                for _ in range(2):
                    enqueue(conn, event("OrderPreparing", restaurant_id=restaurants[i % 2]))
        window = record(rec)
    conn_a = await reader(database_url)
    try:
        everything, _ = await read_through(conn_a, window, limit=1000)
        assert positions(everything) == truth(database_url) and len(everything) == 60
        for selector in (EVERYTHING, Selector(restaurants=(restaurants[0],))):
            for limit in (3, 4, 5, 6, 7):
                after, reached = Position.end_of(window - 1), []
                events: list[LogEvent] = []
                while after < Position.end_of(window):
                    page = await event_log.read(
                        conn_a, after, window, selector=selector, limit=limit
                    )
                    assert page.reached > after and len(page.events) <= limit
                    reached.append(page.reached)
                    events += page.events
                    after = page.reached
                assert reached == sorted(reached) and len(set(reached)) == len(reached)
                assert all(r.window == window for r in reached)
                assert len(reached) >= len(events) // limit
                assert positions(events) == positions(selected(everything, selector))
    finally:
        await conn_a.close()


async def test_a_span_over_many_small_windows_is_exact(database_url: str) -> None:
    """Thirty windows (some empty, some of several transactions, one big) read
    with small pages: each page ends at a whole window or inside one, and
    together they are the log."""
    rng = random.Random(5)
    restaurants = [uuid.uuid4() for _ in range(4)]
    with recording(database_url) as rec:
        for w in range(30):
            transactions = 12 if w == 17 else rng.choice([0, 1, 1, 2, 3])
            for _ in range(transactions):
                with psycopg.connect(database_url) as conn:
                    for _ in range(rng.randint(1, 3)):
                        enqueue(conn, event("OrderAccepted", restaurant_id=rng.choice(restaurants)))
            last = record(rec)
    whole = truth(database_url)
    conn_a = await reader(database_url)
    try:
        everything, _ = await read_through(conn_a, last, limit=1000)
        assert positions(everything) == whole
        for selector in (EVERYTHING, Selector(restaurants=(restaurants[0],)),
                         Selector(restaurants=(restaurants[1], restaurants[2]))):  # fmt: skip
            for limit in (1, 3, 4, 5, 6, 7):
                events, _ = await read_through(conn_a, last, selector=selector, limit=limit)
                assert positions(events) == positions(selected(everything, selector))
            # Resuming from any position read gives the rest exactly.
            events, _ = await read_through(conn_a, last, selector=selector, limit=1000)
            for k in range(0, len(events), 7):
                rest, _ = await read_through(
                    conn_a, last, after=events[k].at, selector=selector, limit=4
                )
                assert positions(rest) == positions(events[k + 1 :])
    finally:
        await conn_a.close()


async def test_a_reinserted_event_id_is_read_once(database_url: str) -> None:
    """A producer retrying a commit it misread re-inserts the same event id:
    the outbox keeps the first row, so the log holds the event once."""
    restaurant = uuid.uuid4()
    once = event("OrderAccepted", restaurant_id=restaurant)
    with recording(database_url) as rec:
        with psycopg.connect(database_url) as conn:
            enqueue(conn, once)
        record(rec)
        with psycopg.connect(database_url) as conn:
            enqueue(conn, once)
            enqueue(conn, event("OrderPreparing", restaurant_id=restaurant))
        last = record(rec)
    conn_a = await reader(database_url)
    try:
        events, _ = await read_through(conn_a, last)
    finally:
        await conn_a.close()
    assert [e.event_type for e in events] == ["OrderAccepted", "OrderPreparing"]


async def test_a_recorded_window_is_announced_by_its_number(database_url: str) -> None:
    listener = await reader(database_url)
    try:
        await listener.execute(f"LISTEN {notify.CHANNEL}")
        with recording(database_url) as rec:
            window = record(rec)
        async for notice in listener.notifies(timeout=5):
            assert notify.decode(notice.payload) == window
            break
        else:
            pytest.fail("no notification for the new window")
    finally:
        await listener.close()


@pytest.fixture
def long_history(database_url: str) -> tuple[str, uuid.UUID, uuid.UUID, uuid.UUID, int]:
    """200,000 retained rows of 2,000 transactions, then three small windows
    of one restaurant's order (of one customer); returns the newest window."""
    restaurant, order, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with recording(database_url) as conn:
        for i in range(2000):
            conn.execute(
                """
                INSERT INTO relay_outbox (event_id, event_type, restaurant_id, order_id,
                                          customer_id, payload, occurred_on_utc)
                SELECT gen_random_uuid(), 'OrderAccepted', gen_random_uuid(), gen_random_uuid(),
                       gen_random_uuid(), '{}', now()
                FROM generate_series(1, 100)
                """
            )
            if i % 100 == 0:
                record(conn)
        for _ in range(3):
            with conn.transaction():
                enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=order,
                                    customer_id=customer))  # fmt: skip
            newest = record(conn)
        conn.execute("ANALYZE relay_outbox")
        conn.execute("ANALYZE relay_windows")
    return database_url, restaurant, order, customer, newest


def plan(
    url: str, text: bytes, params: dict[str, Any], *, generic: bool = False, run: bool = False
) -> str:
    """The plan for these values, or (``generic``) the one a prepared
    statement may settle on, made without them; ``run``: executed (rolled
    back), with the pages each step touched."""
    explain = b"EXPLAIN (ANALYZE, BUFFERS) " if run else b"EXPLAIN "
    with psycopg.connect(url) as conn:
        if not generic:
            rows = conn.execute(explain + text, params).fetchall()
            return "\n".join(r[0] for r in rows)
        names: list[str] = []

        def numbered(match: re.Match[bytes]) -> bytes:
            name = match.group(1).decode()
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}".encode()

        body = re.sub(rb"%\((\w+)\)s", numbered, text)
        conn.execute(b"PREPARE planned AS " + body)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        values = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
        execute = sql.SQL("EXECUTE planned({})" if names else "EXECUTE planned").format(values)
        rows = conn.execute(sql.SQL(explain.decode()) + execute).fetchall()
        conn.rollback()
        return "\n".join(r[0] for r in rows)


def pages(explained: str) -> int:
    """Pages the whole statement touched: its top node's buffer counts."""
    found = re.search(r"Buffers: shared ((?:\w+=\d+ ?)+)", explained)
    assert found is not None, explained
    return sum(int(n) for n in re.findall(r"=(\d+)", found.group(1)))


def _bounds(url: str, since: int, window: int) -> dict[str, Any]:
    """The bound parameters the reads take for windows (since, window]."""
    with psycopg.connect(url) as conn:
        snapshots: dict[int, str] = dict(
            conn.execute(
                "SELECT window_id, snapshot::text FROM relay_windows WHERE window_id IN (%s, %s)",
                (since, window),
            ).fetchall()
        )
    _xmin, since_horizon, since_xip = snapshots[since].split(":")
    return {
        "from_xid": since_horizon,  # from the window's start, as its reads take it
        "from_id": -1,
        "since_xip": "{" + since_xip + "}",
        "horizon": snapshots[window].split(":")[1],
        "snapshot": snapshots[window],
    }


def test_window_reads_stay_on_their_indexes(
    long_history: tuple[str, uuid.UUID, uuid.UUID, uuid.UUID, int],
) -> None:
    """However much history the outbox retains, every read of recent windows
    walks indexes, never the table."""
    url, restaurant, order, customer, newest = long_history
    for selector in (
        EVERYTHING,
        Selector(restaurants=(restaurant,)),
        Selector(restaurants=(restaurant, uuid.uuid4())),
        Selector(order=(restaurant, order)),
        Selector(customer=customer),
    ):
        text, params = _selected("read_window", selector)
        window = {"window": newest, "after_xid": "0", "after_id": -1, "limit": 100}
        bounds = _bounds(url, newest - 1, newest)
        assert "Seq Scan on relay_outbox" not in plan(url, text, {**params, **window, **bounds})
        if selector == EVERYTHING:  # prepared: the generic plan is an ordered index range
            generic = plan(url, text, {**params, **window, **bounds}, generic=True)
            assert "Seq Scan on relay_outbox" not in generic, generic
            assert "Bitmap" not in generic and "Sort Key: o" not in generic, generic
        text, params = _selected("read_span", selector)
        bounds = _bounds(url, newest - 2, newest)
        span = {"after_xid": "0", "after_id": -1, "limit": 100}
        assert "Seq Scan on relay_outbox" not in plan(url, text, {**params, **bounds, **span})


def test_the_idle_probe_stays_on_its_index(
    long_history: tuple[str, uuid.UUID, uuid.UUID, uuid.UUID, int],
) -> None:
    """The recorder's probe runs every few milliseconds on an idle relay: it
    must cost two index probes whatever the outbox retains."""
    url, newest = long_history[0], long_history[4]
    assert "Seq Scan on relay_outbox" not in plan(url, _RECORD_IF_DUE, {})
    bounds = _bounds(url, newest, newest)
    since = {k: bounds[k] for k in ("from_xid", "from_id", "since_xip")}
    params = {"previous": newest, **since, "after_xid": "0", "after_id": -1, "limit": 100}
    # With the new window's first page: prepared, so its generic plan counts.
    generic = plan(url, _RECORD_AND_READ, params, generic=True)
    assert "Seq Scan on relay_outbox" not in generic, generic
    assert "Bitmap" not in generic and "Sort Key: o" not in generic, generic


def _window_beside_other_work(url: str) -> tuple[int, str]:
    """Record a window while another transaction, with an id, is in progress
    and never writes to the outbox (the order service's other work), then
    end it; returns the window and its snapshot (with that transaction listed)."""
    with psycopg.connect(url) as other, recording(url) as conn:
        other.execute("SELECT pg_current_xact_id()")
        with conn.transaction():
            enqueue(conn, event("OrderAccepted", restaurant_id=uuid.uuid4()))
        newest = record(conn)
        other.commit()
        conn.execute("ANALYZE relay_outbox")
        row = conn.execute(
            "SELECT snapshot::text FROM relay_windows WHERE window_id = %s", (newest,)
        ).fetchone()
    assert row is not None and row[0].split(":")[2]  # an in-progress list
    return newest, row[0]


def _assert_idle_probe_stays_on_the_index(url: str) -> None:
    """Until a new window, every idle probe asks whether the listed
    transaction wrote a row: each must stay an index probe."""
    probe = plan(url, _RECORD_IF_DUE, {}, generic=True, run=True)
    assert "Seq Scan on relay_outbox" not in probe and "Tuples Inserted: 0" in probe, probe
    assert pages(probe) < 30, probe


def test_an_idle_probe_after_an_unrelated_transaction_stays_on_the_index(
    long_history: tuple[str, uuid.UUID, uuid.UUID, uuid.UUID, int],
) -> None:
    """The newest window saw a transaction in progress that never wrote to
    the outbox: the probe, and the recorder's turn once rows come, stay on
    the index over 200,000 retained rows."""
    url = long_history[0]
    newest, _snapshot = _window_beside_other_work(url)
    _assert_idle_probe_stays_on_the_index(url)
    bounds = _bounds(url, newest, newest)
    since = {k: bounds[k] for k in ("from_xid", "from_id", "since_xip")}
    params = {"previous": newest, **since, "after_xid": "0", "after_id": -1, "limit": 100}
    turn = plan(url, _RECORD_AND_READ, params, generic=True, run=True)
    assert "Seq Scan on relay_outbox" not in turn and pages(turn) < 30, turn


def test_probes_stay_on_the_index_beside_a_bulk_load(database_url: str) -> None:
    """One transaction of 50,000 rows (a bulk load) makes the planner expect
    thousands of rows per transaction id. Asked with EXISTS whether a listed
    transaction wrote any row, it planned a sequential scan expected to stop
    within a few rows, and read the whole outbox when none had. The
    recorder's probe and the backlog gauge (every 5 s) stay index probes."""
    url = database_url
    with recording(url) as conn:
        before = record(conn)
        conn.execute(
            """
            INSERT INTO relay_outbox (event_id, event_type, restaurant_id, payload, occurred_on_utc)
            SELECT gen_random_uuid(), 'OrderAccepted', gen_random_uuid(), '{}', now()
            FROM generate_series(1, 50000)
            """
        )
        conn.execute("ANALYZE relay_outbox")  # the bulk load is in the statistics
        (bulk,) = conn.execute(
            "SELECT snapshot::text FROM relay_windows WHERE window_id = %s", (before,)
        ).fetchone() or ("",)
        # As the gauge sees the bulk load before a window holds it: counted to its cap.
        gauge = plan(url, query("backlog_unrecorded"),
                     event_log.unrecorded_bounds(bulk, 1000), run=True)  # fmt: skip
        assert "Seq Scan on relay_outbox" not in gauge and pages(gauge) < 100, gauge
        counted = conn.execute(
            query("backlog_unrecorded"), event_log.unrecorded_bounds(bulk, 1000)
        ).fetchone()
        assert counted is not None and counted[0] == 1000
        everything = conn.execute(
            query("backlog_unrecorded"), event_log.unrecorded_bounds(bulk)
        ).fetchone()
        assert everything is not None and everything[0] == 50000  # relay status: all
        record(conn)
    _newest, snapshot = _window_beside_other_work(url)
    _assert_idle_probe_stays_on_the_index(url)
    bounds = event_log.unrecorded_bounds(snapshot)
    backlog = plan(url, query("backlog_unrecorded"), bounds, run=True)
    assert "Seq Scan on relay_outbox" not in backlog and pages(backlog) < 30, backlog


def test_a_new_window_is_read_without_walking_the_retained_history(
    long_history: tuple[str, uuid.UUID, uuid.UUID, uuid.UUID, int],
) -> None:
    """Reading a new window from its start (the recorder's turn, the check,
    a span of windows) touches a few pages however much the outbox retains:
    the index scan starts at the window's bound. Started at the index's first
    entry, it walked 200,000 retained rows, hundreds of pages, per window."""
    url, newest = long_history[0], long_history[4]
    start = {"after_xid": "0", "after_id": -1, "limit": 100}
    text, params = _selected("read_window", EVERYTHING)
    bounds = _bounds(url, newest - 1, newest)
    read = plan(url, text, {**params, **bounds, **start, "window": newest}, generic=True, run=True)
    assert pages(read) < 30, read
    text, params = _selected("read_span", EVERYTHING)
    span = plan(url, text, {**params, **_bounds(url, newest - 2, newest), **start}, run=True)
    assert pages(span) < 30, span
    with psycopg.connect(url) as conn:  # a window is due: the turn records and reads it
        enqueue(conn, event("OrderAccepted", restaurant_id=uuid.uuid4()))
    newest_bounds = _bounds(url, newest, newest)
    since = {k: newest_bounds[k] for k in ("from_xid", "from_id", "since_xip")}
    turn = plan(url, _RECORD_AND_READ, {"previous": newest, **since, **start},
                generic=True, run=True)  # fmt: skip
    assert "Tuples Inserted: 1" in turn and "rows=1 loops=1" in turn, turn
    assert pages(turn) < 40, turn


async def test_a_read_below_what_retention_kept_raises_instead_of_skipping(
    database_url: str,
) -> None:
    """Once retention removed a window, a read that starts in it cannot know
    what it held: it must fail loudly, never return an empty page that jumps
    past the events."""
    with recording(database_url) as conn:
        with conn.transaction():
            enqueue_one(conn, uuid.uuid4())
        first = record(conn)
        with conn.transaction():
            enqueue_one(conn, uuid.uuid4())
        newest = record(conn)
        # Retention with its cut at ``first``: the windows below it are gone.
        conn.execute("DELETE FROM relay_windows WHERE window_id < %s", (first,))
    aconn = await reader(database_url)
    try:
        with pytest.raises(LogPruned, match=f"window {first - 1} is not in the log"):
            await event_log.read(aconn, Position.end_of(first - 1), newest)
        page = await event_log.read(aconn, Position.end_of(first), newest)
        assert len(page.events) == 1 and page.reached == Position.end_of(newest)
    finally:
        await aconn.close()


@pytest.mark.parametrize("in_progress_before", [False, True])
async def test_pages_of_one_big_unanalysed_transaction_each_fetch_one_page(
    database_url: str, in_progress_before: bool
) -> None:
    """A producer's one transaction of 20,000 rows, read a page at a time
    before any ANALYZE has seen it, as the check and the hub read it (a
    prepared statement on a relay session): each page fetches its own rows,
    not every row left in the window (a quadratic read). Whether the
    transaction was in progress when the window before it closed (then the
    read probes it by id) or began after (a range of the index)."""
    with recording(database_url) as rec:
        record(rec)
        with psycopg.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()")
            if in_progress_before:
                # A later transaction commits first, so the window that closes
                # now lists the big one as in progress.
                with psycopg.connect(database_url) as other:
                    other.execute("SELECT pg_current_xact_id()")
                record(rec)
            cur.execute(
                """
                INSERT INTO relay_outbox (event_id, event_type, restaurant_id, order_id,
                                          payload, occurred_on_utc)
                SELECT gen_random_uuid(), 'OrderAccepted', gen_random_uuid(), gen_random_uuid(),
                       '{}', now()
                FROM generate_series(1, 20000)
                """
            )
        window = record(rec)
        middle = rec.execute(
            "SELECT xid::text, id FROM relay_outbox ORDER BY xid, id OFFSET 10000 LIMIT 1"
        ).fetchone()
    assert middle is not None
    text, params = _selected("read_window", EVERYTHING)
    values = {**params, **_bounds(database_url, window - 1, window), "window": window,
              "after_xid": middle[0], "after_id": middle[1], "limit": 1000}  # fmt: skip
    assert (values["since_xip"] != "{}") == in_progress_before
    session = await aconnect(database_url, autocommit=True, role="test reader")
    try:
        for _ in range(2):  # the first execution of a prepared statement, and a later one
            page = await session.execute(text, values, prepare=True)
            assert len(await page.fetchall()) == 1000
        body = re.sub(rb"%\((\w+)\)s", lambda m: b"$" + str(list(values).index(
            m.group(1).decode()) + 1).encode(), text)  # fmt: skip
        await session.execute(b"PREPARE page AS " + body)
        literals = sql.SQL(", ").join(sql.Literal(v) for v in values.values())
        explained = await session.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page({})").format(literals)
        )
        found = await explained.fetchone()
    finally:
        await session.close()
    assert found is not None
    fetched = _outbox_rows(found[0][0]["Plan"])
    assert fetched <= 1000, f"a page of 1,000 fetched {fetched} rows of the outbox"


def _outbox_rows(node: dict[str, Any]) -> int:
    """Rows the plan's scans of relay_outbox returned, over all their loops."""
    own = node["Actual Rows"] * node.get("Actual Loops", 1)
    mine = own if node.get("Relation Name") == "relay_outbox" else 0
    return mine + sum(_outbox_rows(child) for child in node.get("Plans", []))
