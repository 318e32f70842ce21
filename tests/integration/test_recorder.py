"""The recorder against a real PostgreSQL: windows only when something
committed, each window checked once, dead letters filed once, one recorder
at a time, and the two wake-up modes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from relay import log as event_log
from relay.log import LogEvent, Page, Position
from relay.outbox import enqueue
from relay.recorder import CHECK, Recorder, RecorderConfig
from tests.helpers.orders import CHAIN, INSERT_SQL, event, payload

FAST = RecorderConfig(poll_idle=0.005, safety_sweep=0.3)


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


class Running:
    """A recorder running in this event loop, and every page it handed on."""

    def __init__(self, url: str, config: RecorderConfig) -> None:
        self.pages: list[Page] = []
        self.recorder = Recorder(url, config, on_page=self.pages.append)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.recorder.run(self._stop))

    @property
    def stopped(self) -> bool:
        return self._task.done()

    @property
    def events(self) -> list[LogEvent]:
        return [e for page in self.pages for e in page.events]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 10)


@asynccontextmanager
async def recorder(url: str, config: RecorderConfig = FAST) -> AsyncIterator[Running]:
    running = Running(url, config)
    try:
        await until(lambda: running.recorder.leading, what="the recorder lease")
        yield running
    finally:
        await running.stop()


def scalar(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql.encode(), params).fetchone()
    assert row is not None
    return row[0]


def windows(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM relay_windows"))


def check_is_done(url: str) -> bool:
    """The check's durable offset is at the end of the newest window."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT o.window_id = (SELECT max(window_id) FROM relay_windows) AND o.xid = %s"
            " FROM relay_offsets AS o WHERE o.follower = %s",
            (Position.end_of(0).xid, CHECK),
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("batch_size", [1, 7, 5000])
async def test_hands_on_committed_events_in_order_and_keeps_the_outbox(
    database_url: str, batch_size: int
) -> None:
    restaurants = [uuid.uuid4() for _ in range(3)]
    config = RecorderConfig(batch_size=batch_size, poll_idle=0.005, safety_sweep=0.3)
    async with recorder(database_url, config) as running:
        with psycopg.connect(database_url) as conn:
            for r in restaurants:
                order = uuid.uuid4()
                for kind in CHAIN:
                    enqueue(conn, event(kind, restaurant_id=r, order_id=order))
        await until(lambda: len(running.events) == 12, what="12 events")
        assert running.recorder.published == 12
    events = running.events
    ats = [e.at for e in events]
    assert ats == sorted(ats) and len(set(ats)) == 12
    for r in restaurants:
        assert [e.event_type for e in events if e.restaurant_id == str(r)] == CHAIN
    assert all("customerName" not in e.data for e in events)
    # Pages follow each other: each starts where the previous one reached.
    assert all(b.after == a.reached for a, b in itertools.pairwise(running.pages))
    # The outbox is the log: rows stay until retention.
    assert scalar(database_url, "SELECT count(*) FROM relay_outbox") == 12


async def test_an_idle_recorder_writes_nothing(database_url: str) -> None:
    """No window without a commit: an idle relay costs two index probes a tick,
    never a write (no WAL, no table growth)."""
    async with recorder(database_url) as running:
        assert windows(database_url) == 2  # -1 and 0: nothing has committed since
        await asyncio.sleep(1.0)
        assert windows(database_url) == 2 and running.recorder.windows == 0
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderAccepted", restaurant_id=uuid.uuid4()))
        await until(lambda: len(running.events) == 1, what="the event")
        await until(lambda: check_is_done(database_url), what="the check's offset")
        recorded = windows(database_url)
        assert recorded == 3
        offset = scalar(
            database_url, "SELECT updated_at FROM relay_offsets WHERE follower = %s", (CHECK,)
        )
        await asyncio.sleep(1.0)
        assert windows(database_url) == recorded
        assert (
            scalar(
                database_url,
                "SELECT updated_at FROM relay_offsets WHERE follower = %s",
                (CHECK,),
            )
            == offset
        )
    assert running.recorder.windows == 1


HOSTILE = "B-1'); DROP TABLE relay_outbox; -- 100% \\ \\' \" \\u0000 ñ 🍕 $$ E'x'"


def insert(conn: psycopg.Connection[Any], kind: str, restaurant: uuid.UUID, order: uuid.UUID,
           body: dict[str, Any]) -> uuid.UUID:  # fmt: skip
    """A row the producer's own validation (``enqueue``) would have refused."""
    event_id = uuid.uuid4()
    conn.execute(INSERT_SQL, (event_id, kind, restaurant, order, None, json.dumps(body)))
    return event_id


async def test_dead_letters_are_filed_once_and_later_rows_flow(database_url: str) -> None:
    """Rows every reader rejects are filed with their reason, once, even when a
    new recorder re-reads their windows (a crash before the check's offset
    was saved); valid rows around them, hostile text included, flow verbatim."""
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    wrong = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
    wrong["newStatus"] = "Delivered"
    big = payload("OrderAccepted", restaurant_id=restaurant, order_id=order)
    big["orderNumber"] = "N" * 20_000
    quoted = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
    quoted["newStatus"] = HOSTILE
    with psycopg.connect(database_url) as conn:
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=order,
                            order_number=HOSTILE))  # fmt: skip
        bad = [
            insert(conn, "OrderPreparing", restaurant, order, wrong),
            insert(conn, "OrderTeleported", restaurant, order, wrong),
            insert(conn, "OrderAccepted", restaurant, order, big),
            insert(conn, "OrderPreparing", restaurant, order, quoted),
        ]
        conn.commit()
        enqueue(conn, event("OrderReadyForDelivery", restaurant_id=restaurant, order_id=order))
    async with recorder(database_url) as first:
        await until(lambda: check_is_done(database_url) and len(first.events) == 2)
    assert first.recorder.dead_lettered == 4
    assert [e.event_type for e in first.events] == ["OrderAccepted", "OrderReadyForDelivery"]
    assert json.loads(first.events[0].data)["orderNumber"] == HOSTILE
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT event_id, reason FROM relay_dead_letters ORDER BY id")
        reasons: dict[uuid.UUID, str] = dict(rows.fetchall())
    assert list(reasons) == bad
    assert "newStatus" in reasons[bad[0]] and "OrderTeleported" in reasons[bad[1]]
    oversized = reasons[bad[2]]
    assert "orderNumber: longer than 100 characters (20000)" in oversized and len(oversized) < 500
    assert HOSTILE[:40] in reasons[bad[3]]

    # The check's offset lost (as if the recorder died before saving it): the
    # next recorder reads every window again and files nothing twice.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE relay_offsets SET window_id = -1 WHERE follower = %s", (CHECK,))
    async with recorder(database_url) as second:
        with psycopg.connect(database_url) as conn:
            bad.append(insert(conn, "OrderAccepted", restaurant, order, big))
            conn.commit()
            enqueue(conn, event("OrderDelivered", restaurant_id=restaurant, order_id=order))
        await until(lambda: check_is_done(database_url) and len(second.events) == 3)
    assert second.recorder.dead_lettered == 5  # it saw them all again...
    with psycopg.connect(database_url) as conn:
        filed = [e for (e,) in conn.execute("SELECT event_id FROM relay_dead_letters ORDER BY id")]
    assert filed == bad  # ...and filed each once


async def test_one_recorder_at_a_time_and_a_standby_takes_over(database_url: str) -> None:
    leader = Running(database_url, FAST)
    standby: Running | None = None
    try:
        await until(lambda: leader.recorder.leading, what="the first lease")
        standby = Running(database_url, FAST)
        await until(lambda: standby is not None and standby.recorder.running)
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderAccepted", restaurant_id=uuid.uuid4()))
        await until(lambda: len(leader.events) == 1, what="the leader's window")
        await asyncio.sleep(3 * FAST.safety_sweep)
        assert not standby.recorder.leading
        assert standby.recorder.windows == 0 and not standby.events
        assert windows(database_url) == 3

        await leader.stop()
        started = time.monotonic()
        await until(lambda: standby is not None and standby.recorder.leading, what="takeover")
        assert time.monotonic() - started < FAST.safety_sweep + 1.0
        after = event("OrderPreparing", restaurant_id=uuid.uuid4())
        with psycopg.connect(database_url) as conn:
            enqueue(conn, after)
        await until(lambda: any(e.event_id == str(after.event_id) for e in standby.events))
        assert standby.recorder.windows == 1 and windows(database_url) == 4
    finally:
        if not leader.stopped:
            await leader.stop()
        if standby is not None:
            await standby.stop()


async def test_notify_wakeup_installs_the_trigger_and_poll_removes_it(database_url: str) -> None:
    """RELAY_WAKEUP=notify: producers' commits NOTIFY the recorder, so an event
    is handed on at once even with the slowest probing; poll mode takes the
    trigger away again (producers stop paying for the NOTIFY)."""

    def trigger() -> bool:
        return bool(
            scalar(
                database_url,
                "SELECT count(*) = 1 FROM pg_trigger WHERE tgname = 'relay_outbox_notify'",
            )
        )

    slow_probes = RecorderConfig(wakeup="notify", poll_idle=30.0, safety_sweep=30.0)
    async with recorder(database_url, slow_probes) as running:
        assert trigger()
        await until(lambda: running.recorder.listener_connected is True, what="the listener")
        await asyncio.sleep(0.2)  # the loop is now waiting for a wake-up
        item = event("OrderAccepted", restaurant_id=uuid.uuid4())
        with psycopg.connect(database_url) as conn:
            enqueue(conn, item)
        await until(lambda: len(running.events) == 1, timeout=5, what="a NOTIFY wake-up")
        assert running.events[0].event_id == str(item.event_id)
    async with recorder(database_url, FAST) as running:
        assert running.recorder.listener_connected is None
        assert not trigger()
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderPreparing", restaurant_id=uuid.uuid4()))
        await until(lambda: len(running.events) >= 1, what="a polled event")


async def test_the_check_resumes_from_its_offset(database_url: str) -> None:
    """A new recorder does not hand on again what the last one checked and saved."""
    async with recorder(database_url) as first:
        with psycopg.connect(database_url) as conn:
            enqueue(conn, event("OrderAccepted", restaurant_id=uuid.uuid4()))
        await until(lambda: check_is_done(database_url) and len(first.events) == 1)
    conn_a = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        saved = await event_log.read_offset(conn_a, CHECK)
    finally:
        await conn_a.close()
    assert saved == Position.end_of(first.events[0].at.window)
    async with recorder(database_url) as second:
        item = event("OrderPreparing", restaurant_id=uuid.uuid4())
        with psycopg.connect(database_url) as conn:
            enqueue(conn, item)
        await until(lambda: len(second.events) >= 1)
    assert [e.event_id for e in second.events] == [str(item.event_id)]


async def test_windows_are_never_closer_than_the_interval(database_url: str) -> None:
    """A producer committing every 5 ms: with a 50 ms interval the recorder
    closes at most one window per 50 ms, and every row still arrives, in
    order; without one it closes a window for nearly every commit."""
    restaurant = uuid.uuid4()

    async def produce_for(seconds: float) -> list[uuid.UUID]:
        written: list[uuid.UUID] = []
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                item = event("OrderAccepted", restaurant_id=restaurant)
                await conn.execute(
                    INSERT_SQL,
                    (item.event_id, item.event_type, item.restaurant_id, item.order_id,
                     item.customer_id, json.dumps(item.payload)),
                )  # fmt: skip
                written.append(item.event_id)
                await asyncio.sleep(0.005)
        finally:
            await conn.close()
        return written

    counts = {}
    for interval in (0.05, 0.0):
        config = RecorderConfig(poll_idle=0.005, safety_sweep=0.3, window_interval=interval)
        async with recorder(database_url, config) as running:
            before = windows(database_url)
            written = await produce_for(1.0)
            wanted = {str(w) for w in written}
            # Waiting for every written row, not for a count: a new recorder
            # may check the previous one's last page again (its offset moves
            # after the page), and those rows would fill a count early.
            await until(
                lambda r=running, w=wanted: w <= {e.event_id for e in r.events},  # type: ignore[misc]
                what="every row checked",
            )
            counts[interval] = windows(database_url) - before
            mine = [uuid.UUID(e.event_id) for e in running.events if e.event_id in wanted]
            assert mine == written  # each once, in commit order
    assert counts[0.05] <= 1.0 / 0.05 + 3, counts
    assert counts[0.0] > 2 * counts[0.05], counts
