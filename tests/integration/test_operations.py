"""`relay status`, `relay dead-letters` and retention against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import psycopg

from relay import log as event_log
from relay.log import ORIGIN, LogEvent, Position, Rejected
from relay.maintenance import Maintenance, prune
from relay.metrics import REGISTRY
from relay.outbox import enqueue
from relay.sql import query
from tests.helpers.orders import INSERT_SQL, event, payload


def _relay(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], env={**os.environ, "DATABASE_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _record(url: str) -> int:
    """Record a window now, with the recorder's own query."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query("record_window")).fetchone()
    assert row is not None
    return int(row[0])


async def _read_log(url: str, after: Position = ORIGIN) -> tuple[list[LogEvent], list[Rejected]]:
    """Every row of the log after ``after`` (or the oldest retained), as readers see it."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        head = await event_log.head(conn)
        at = max(after, head.oldest)
        events: list[LogEvent] = []
        rejected: list[Rejected] = []
        while at < head.end:
            page = await event_log.read(conn, at, head.window, limit=3)
            events += page.events
            rejected += page.rejected
            at = page.reached
        return events, rejected
    finally:
        await conn.close()


def test_status_without_a_running_relay_shows_the_backlog(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(7):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
        conn.execute(
            "INSERT INTO relay_dead_letters (event_id, event_type, schema_version, restaurant_id,"
            " payload, occurred_on_utc, enqueued_at, reason)"
            " VALUES (gen_random_uuid(), 'X', 1, gen_random_uuid(), '{}', now(), now(), 'bad')"
        )
        for i, age in enumerate((2, 90)):
            conn.execute(
                "INSERT INTO relay_replicas (replica_id, hostname, pid, roles, heartbeat_at)"
                " VALUES (%s, 'h', 1, '{dispatcher,gateway}', now() - make_interval(secs => %s))",
                (f"replica-{i}", age),
            )
    result = _relay(database_url, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backlog"] == report["unrecorded"] == 7  # committed, in no window yet
    assert report["oldest_unrecorded_s"] is not None and report["oldest_unrecorded_s"] >= 0
    assert report["unchecked_windows"] == 0
    assert report["dead_letters"] == 1
    assert [r["replica_id"] for r in report["replicas"]] == ["replica-0"]  # the other is stale
    text = _relay(database_url, "status")
    assert "backlog            7 pending" in text.stdout
    # A window recorded, not yet checked: still pending, now in a window.
    window = _record(database_url)
    report = json.loads(_relay(database_url, "status", "--json").stdout)
    assert report["backlog"] == report["unchecked_rows"] == 7
    assert report["unrecorded"] == 0 and report["oldest_unrecorded_s"] is None
    assert report["unchecked_windows"] == 1 and report["last_window"] == window
    assert 0 <= report["last_window_age_s"] < 30
    assert report["windowed_last_minute"] == 7 and report["window_lag_max_s"] >= 0
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE relay_offsets SET window_id = %s, xid = 9223372036854775807,"
            " id = 9223372036854775807 WHERE follower = 'relay.check'",
            (window,),
        )
    report = json.loads(_relay(database_url, "status", "--json").stdout)
    assert report["backlog"] == 0 and report["unchecked_windows"] == 0


def test_status_with_unreachable_database_is_one_line() -> None:
    result = _relay("postgresql://u:pw@127.0.0.1:1/x", "status")
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1


def test_dead_letters_list_and_retry_after_fixing_the_row(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    bad = payload("OrderAccepted", restaurant_id=restaurant, order_id=order)
    bad["newStatus"] = "Preparing"
    still_bad = dict(bad)
    with psycopg.connect(database_url) as conn:
        for body in (bad, still_bad):
            conn.execute(
                "INSERT INTO relay_dead_letters (event_id, event_type, schema_version,"
                " restaurant_id, order_id, payload, occurred_on_utc, enqueued_at, reason)"
                " VALUES (gen_random_uuid(), 'OrderAccepted', 1, %s, %s, %s, now(), now(), 'x')",
                (restaurant, order, json.dumps(body)),
            )
        first, second = [
            r for (r,) in conn.execute("SELECT id FROM relay_dead_letters ORDER BY id")
        ]
        # The operator fixes the first row's payload.
        conn.execute(
            "UPDATE relay_dead_letters"
            " SET payload = jsonb_set(payload, '{newStatus}', '\"Accepted\"') WHERE id = %s",
            (first,),
        )
    listing = json.loads(_relay(database_url, "dead-letters", "list", "--json").stdout)
    assert [e["id"] for e in listing] == [first, second]
    result = _relay(database_url, "dead-letters", "retry", "--all")
    assert result.returncode == 1  # one still fails
    assert "re-queued 1" in result.stdout and "newStatus" in result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (1,)
        left = conn.execute("SELECT id, attempts FROM relay_dead_letters").fetchall()
    assert left == [(second, 2)]
    again = _relay(database_url, "dead-letters", "retry")
    assert again.returncode == 2 and "--all" in again.stderr


async def test_a_retried_row_replaces_its_original_in_a_later_window(database_url: str) -> None:
    restaurant, order, event_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    bad = payload("OrderAccepted", restaurant_id=restaurant, order_id=order)
    bad["newStatus"] = "Preparing"
    with psycopg.connect(database_url) as conn:
        conn.execute(INSERT_SQL, (event_id, "OrderAccepted", restaurant, order, None,
                                  json.dumps(bad)))  # fmt: skip
    first = _record(database_url)
    events, rejected = await _read_log(database_url)
    assert events == [] and [r.event_id for r in rejected] == [str(event_id)]
    with psycopg.connect(database_url) as conn:  # the recorder's check files it
        conn.execute(
            query("record_dead_letters"),
            {"ids": [rejected[0].row_id], "reasons": [rejected[0].reason]},
        )
        conn.execute(
            "UPDATE relay_dead_letters"
            " SET payload = jsonb_set(payload, '{newStatus}', '\"Accepted\"')"
        )
    result = _relay(database_url, "dead-letters", "retry", "--all")
    assert result.returncode == 0 and "re-queued 1" in result.stdout, result.stderr
    second = _record(database_url)
    events, rejected = await _read_log(database_url)
    # Once, valid, in the later window; the rejected original is gone.
    assert [(e.event_id, e.at.window) for e in events] == [(str(event_id), second)]
    assert rejected == [] and second > first
    assert json.loads(events[0].data)["newStatus"] == "Accepted"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_dead_letters").fetchone() == (0,)


def _age_windows(url: str, through: int, age: str = "2 days") -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE relay_windows SET recorded_at = now() - %s::interval WHERE window_id <= %s",
            (age, through),
        )


def _outbox_ids(url: str) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return {r for (r,) in conn.execute("SELECT event_id FROM relay_outbox").fetchall()}


async def test_retention_cuts_whole_windows_in_batches(database_url: str) -> None:
    restaurant = uuid.uuid4()
    old = [event("OrderAccepted", restaurant_id=restaurant) for _ in range(10)]
    kept = [event("OrderAccepted", restaurant_id=restaurant) for _ in range(4)]
    pending = event("OrderAccepted", restaurant_id=restaurant)
    with psycopg.connect(database_url) as conn:
        for e in old[:6]:
            enqueue(conn, e)
    _record(database_url)
    with psycopg.connect(database_url) as conn:
        for e in old[6:]:
            enqueue(conn, e)
    cut = _record(database_url)
    with psycopg.connect(database_url) as conn:
        for e in kept:
            enqueue(conn, e)
    newest = _record(database_url)
    with psycopg.connect(database_url) as conn:
        enqueue(conn, pending)  # in no window yet
    _age_windows(database_url, cut)
    aconn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        assert await prune(aconn, timedelta(hours=24), batch=3) == 10
        head = await event_log.head(aconn)
        assert await prune(aconn, timedelta(hours=24), batch=3) == 0  # nothing more to cut
    finally:
        await aconn.close()
    assert (head.window, head.pruned_through) == (newest, cut)
    assert _outbox_ids(database_url) == {e.event_id for e in [*kept, pending]}
    with psycopg.connect(database_url) as conn:
        windows = [w for (w,) in conn.execute("SELECT window_id FROM relay_windows ORDER BY 1")]
    assert windows == [cut, newest]  # the cut stays: the next window's previous snapshot
    # A reader resumes after the cut and reads exactly what was kept.
    events, _ = await _read_log(database_url)
    assert [e.event_id for e in events] == [str(e.event_id) for e in kept]


async def test_an_interrupted_retention_run_is_finished_by_the_next(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(5):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    cut = _record(database_url)
    with psycopg.connect(database_url) as conn:
        # The previous run announced the cut, then stopped before deleting.
        conn.execute(query("retention_mark"), {"cut": cut})
    aconn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        assert await prune(aconn, timedelta(hours=24)) == 5  # no window is that old
    finally:
        await aconn.close()
    assert _outbox_ids(database_url) == set()


async def test_retention_keeps_rows_until_their_window_is_old(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(3):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    window = _record(database_url)
    with psycopg.connect(database_url) as conn:
        # Old rows (an outage of the recorder) count from their window, not their insert.
        conn.execute("UPDATE relay_outbox SET enqueued_at = now() - interval '3 days'")
    aconn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        assert await prune(aconn, timedelta(hours=24)) == 0
        assert (await event_log.head(aconn)).pruned_through < window
        assert await prune(aconn, timedelta(0)) == 3
    finally:
        await aconn.close()


async def test_maintenance_prunes_vacuums_and_reports_the_backlog(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(3):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    _record(database_url)
    with psycopg.connect(database_url) as conn:
        for _ in range(2):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))  # in no window
    keeper = Maintenance(
        database_url, replica_id="keeper", roles=lambda: ["dispatcher"], retention=timedelta(0),
        published=lambda: 0, heartbeat_every=0.05, prune_every=0.05, vacuum_every=0.05,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(_outbox_ids(database_url)) == 2:
                break
        assert len(_outbox_ids(database_url)) == 2  # the recorded rows are gone, no others
        assert REGISTRY.get_sample_value("relay_backlog") == 2  # rows no window holds yet
        with psycopg.connect(database_url) as conn:
            seen = conn.execute("SELECT replica_id FROM relay_replicas").fetchall()
        assert seen == [("keeper",)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_bad_settings_are_one_line_with_exit_2() -> None:
    env = {**os.environ, "PORT": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "PORT" in result.stderr and "Traceback" not in result.stderr
    env = {**os.environ, "RELAY_RETENTION": "forever"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "RELAY_RETENTION" in result.stderr


def test_run_without_a_token_key_is_refused(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_JWT")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "run"], env={**env, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "RELAY_JWT_SECRET" in result.stderr and "RELAY_JWT_JWKS" in result.stderr


def test_config_masks_secrets() -> None:
    env = {
        **os.environ,
        "RELAY_JWT_SECRET": "super-secret-value-123",
        "DATABASE_URL": "postgresql://app:db-password-456@db.internal:5432/orders",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert "super-secret-value-123" not in result.stdout and "db-password-456" not in result.stdout
    assert "db.internal:5432" in result.stdout and "RELAY_JWT_SECRET" in result.stdout
