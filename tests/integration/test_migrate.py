"""`relay migrate`: idempotent, concurrent-safe, tamper-evident, clear when unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay import log as event_log
from relay.errors import MigrationTampered
from relay.events import Envelope, known_event_types, render
from relay.events.stored import decode_payload
from relay.log import ORIGIN, LogEvent, Position, Rejected, Selector
from relay.migrate import migrate, migrations
from relay.outbox import enqueue
from relay.sql import query
from tests.helpers.orders import CHAIN, INSERT_SQL, event, payload

ROOT = Path(__file__).resolve().parents[2]


def _relay(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _schema(url: str) -> list[tuple[str, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """
            SELECT table_name, column_name, data_type, is_nullable
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name LIKE 'relay\\_%'
            ORDER BY table_name, ordinal_position
            """
        ).fetchall()


def test_migration_files_are_numbered_and_named() -> None:
    names = [m.name for m in migrations()]
    assert names == sorted(names)
    assert [n[:4] for n in names] == [f"{i:04d}" for i in range(1, len(names) + 1)]


def test_migrate_twice_changes_nothing(empty_database_url: str) -> None:
    first = _relay("migrate", url=empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    before = _schema(empty_database_url)
    second = _relay("migrate", url=empty_database_url)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert _schema(empty_database_url) == before


def test_two_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relay", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("applied" in out for out, _ in outputs) == 1
    with psycopg.connect(empty_database_url) as conn:
        count = conn.execute("SELECT count(*) FROM relay_schema_migrations").fetchone()
    assert count == (len(migrations()),)


def test_schema_matches_the_contract(database_url: str) -> None:
    columns = {(t, c): (d, n) for t, c, d, n in _schema(database_url)}
    producer = {
        "event_id": ("uuid", "NO"),
        "event_type": ("text", "NO"),
        "schema_version": ("integer", "NO"),
        "restaurant_id": ("uuid", "NO"),
        "order_id": ("uuid", "YES"),
        "customer_id": ("uuid", "YES"),
        "payload": ("jsonb", "NO"),
        "occurred_on_utc": ("timestamp with time zone", "NO"),
    }
    for column, expected in producer.items():
        assert columns[("relay_outbox", column)] == expected, column
    # Every relay-owned column has a default, so the producer names only the contract columns.
    with psycopg.connect(database_url) as conn:
        without_default = conn.execute(
            """
            SELECT column_name FROM information_schema.columns
            WHERE table_name = 'relay_outbox' AND column_default IS NULL
              AND is_generated = 'NEVER' AND is_identity = 'NO' AND is_nullable = 'NO'
            """
        ).fetchall()
    assert {c for (c,) in without_default} <= set(producer)
    tables = {t for t, _ in columns}
    assert all(t.startswith("relay_") for t in tables)


def test_tampered_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", folder)
    migrate(empty_database_url, folder)
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationTampered, match=first.name):
        migrate(empty_database_url, folder)


def test_unreachable_database_is_one_clear_line() -> None:
    result = _relay("migrate", url="postgresql://relay:s3cret-pw@127.0.0.1:1/orders", timeout=30)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:1" in lines[0] and "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_missing_database_url_is_a_config_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


# -- upgrade: 0007's per-partition log becomes window 0 of the outbox --------

LAST_LOG_MIGRATION = "0007_customer_streams.sql"
EVERYTHING = Selector()


def _at(minute: int, micro: int = 0) -> datetime:
    return datetime(2026, 11, 25, 12, minute, 7, micro, tzinfo=UTC)


def _retained_cases(
    restaurant: uuid.UUID, customer: uuid.UUID
) -> list[tuple[str, str, uuid.UUID | None, uuid.UUID | None, datetime]]:
    """(event type, payload JSON as a producer wrote it, order column, customer
    column, occurred_on_utc): every event type, in the shapes producers send
    (PascalCase, PII to drop, an int order number, money as JSON numbers,
    offsets, a status event without occurredOnUtc, a null order column)."""
    order = uuid.uuid4()
    cases: list[tuple[str, str, uuid.UUID | None, uuid.UUID | None, datetime]] = []
    for i, kind in enumerate(
        ["OrderPaymentSucceeded", "OrderPaymentFailed", *CHAIN, "OrderRejected", "OrderCancelled"]
    ):
        body = payload(kind, restaurant_id=restaurant, order_id=order, at=_at(i, 125_000 * i))
        cases.append((kind, json.dumps(body), order, customer, _at(i, 123_456)))
    pascal = payload("OrderAccepted", restaurant_id=restaurant, order_id=order, at=_at(9))
    pascal = {key[0].upper() + key[1:]: value for key, value in pascal.items()}
    pascal["OrderNumber"] = 1001  # .NET's int order number
    cases.append(("OrderAccepted", json.dumps(pascal), order, None, _at(9)))
    bare = payload("OrderPreparing", restaurant_id=restaurant, order_id=order, at=_at(10))
    del bare["occurredOnUtc"]  # taken from the row's column
    cases.append(("OrderPreparing", json.dumps(bare), order, customer, _at(10, 5)))
    shifted = payload("OrderCancelled", restaurant_id=restaurant, order_id=order, at=_at(11))
    shifted["lastUpdateTimestamp"] = "2026-11-25T14:11:07.5+02:00"
    cases.append(("OrderCancelled", json.dumps(shifted), None, None, _at(11)))
    coupon = uuid.uuid4()
    cases.append(
        (
            "CouponUsed",
            f'{{"CouponId": "{coupon}", "PreviousUsageCount": 3, "NewUsageCount": 4,'
            ' "UsedAt": "2026-11-25T12:12:00Z", "customerEmail": "a@b.c"}',
            None,
            customer,
            _at(12),
        )
    )
    for kind, amount in (("RevenueRecorded", "1E+3"), ("PlatformFeeRecorded", "3.20")):
        cases.append(
            (
                kind,
                f'{{"restaurantAccountId": "{uuid.uuid4()}", "restaurantId": "{restaurant}",'
                f' "orderId": "{order}", "amount": {amount}, "newBalance": "-10.000001"}}',
                order,
                None,
                _at(13, 999_999),
            )
        )
    alert = {
        "orderId": str(order),
        "restaurantId": str(restaurant),
        "orderNumber": None,
        "kind": "DeliveryLate",
        "expectedBy": "2026-11-25T12:40:00Z",
        "detectedAt": "2026-11-25T12:41:00.000100Z",
    }
    cases.append(("OrderDelayAlert", json.dumps(alert), order, customer, _at(14)))
    return cases


def _published(
    restaurant: uuid.UUID,
    kind: str,
    text: str,
    order: uuid.UUID | None,
    customer: uuid.UUID | None,
    occurred: datetime,
    counters: dict[int, int],
) -> dict[str, Any]:
    """A relay_events row as the old dispatcher wrote it: rendered, at the next
    position of the restaurant's partition (the uuid's last byte & 63)."""
    event_id = uuid.uuid4()
    broadcast = render(
        Envelope(str(event_id), kind, 1, str(restaurant), str(order) if order else None,
                 str(customer) if customer else None, occurred, decode_payload(text, kind),
                 derived=kind == "OrderDelayAlert")
    )  # fmt: skip
    partition = restaurant.bytes[15] & 63
    counters[partition] = counters.get(partition, 0) + 1
    return {
        "partition": partition,
        "position": counters[partition],
        "event_id": event_id,
        "event_type": kind,
        "sse_event": broadcast.sse_event,
        "restaurant_id": restaurant,
        "order_id": order,
        "customer_id": customer,
        "channels": list(broadcast.channels),
        "data": broadcast.json,  # stored verbatim (json)
        "rendered": broadcast.json,  # what the relay renders from it again
        "occurred_on_utc": occurred,
    }


def test_upgrade_keeps_every_retained_and_pending_event(
    empty_database_url: str, tmp_path: Path
) -> None:
    """0008 on a 0007 installation with retained events, pending rows and
    follower offsets: the retained log is window 0 in its old order with the
    same bytes, pending rows are the first window after, followers resume at
    their first undelivered event, and no event is published twice."""
    url = empty_database_url
    old = tmp_path / "old"
    old.mkdir()
    for path in sorted((ROOT / "migrations").glob("*.sql")):
        if path.name <= LAST_LOG_MIGRATION:
            shutil.copy(path, old / path.name)
    migrate(url, old)

    # Retained events of three restaurants, interleaved as the old dispatcher
    # published them: positions 1..n per partition (last byte of the uuid & 63).
    restaurants: list[uuid.UUID] = []
    while len(restaurants) < 3:
        candidate = uuid.uuid4()
        if candidate.bytes[15] & 63 not in {r.bytes[15] & 63 for r in restaurants}:
            restaurants.append(candidate)
    customer = uuid.uuid4()
    per_restaurant = [_retained_cases(r, customer) for r in restaurants]
    retained: list[dict[str, Any]] = []
    counters: dict[int, int] = {}
    for k in range(len(per_restaurant[0])):
        for restaurant, cases in zip(restaurants, per_restaurant, strict=True):
            retained.append(_published(restaurant, *cases[k], counters))
    assert {r["event_type"] for r in retained} == known_event_types()
    # A relay of schema 0007 from before a status payload's explicit null
    # occurredOnUtc took the row's time broadcast it as null; re-rendered, it
    # carries the row's time (SPEC §1): the one retained event whose bytes change.
    body = payload("OrderAccepted", restaurant_id=restaurants[0], order_id=uuid.uuid4())
    body["occurredOnUtc"] = None
    legacy = _published(restaurants[0], "OrderAccepted", json.dumps(body),
                        uuid.UUID(body["orderId"]), None, _at(20, 42), counters)  # fmt: skip
    stamp = json.loads(legacy["rendered"])["occurredOnUtc"]
    assert stamp == "2026-11-25T12:20:07.000042Z"  # the row's time
    legacy["data"] = legacy["data"].replace(f'"occurredOnUtc":"{stamp}"', '"occurredOnUtc":null')
    assert legacy["data"] != legacy["rendered"]
    retained.append(legacy)
    old_order = sorted(retained, key=lambda r: (r["partition"], r["position"]))
    first, second, third = sorted(counters)
    pending = [event("OrderAccepted", restaurant_id=restaurants[i % 3]) for i in range(5)]
    with psycopg.connect(url) as conn:
        for row in retained:
            conn.execute(
                """
                INSERT INTO relay_events (partition, position, event_id, event_type,
                    schema_version, sse_event, restaurant_id, order_id, customer_id, channels,
                    data, occurred_on_utc, enqueued_at)
                VALUES (%(partition)s, %(position)s, %(event_id)s, %(event_type)s, 1,
                    %(sse_event)s, %(restaurant_id)s, %(order_id)s, %(customer_id)s,
                    %(channels)s, %(data)s::json, %(occurred_on_utc)s, now())
                """,
                row,
            )
        for partition, last in counters.items():
            conn.execute(
                "UPDATE relay_partitions SET last_position = %s, published_at = now()"
                " WHERE partition = %s",
                (last, partition),
            )
        # Pending rows, and a producer's retry of an event already published.
        enqueue(conn, pending[0])
        enqueue(conn, pending[1])
        duplicate = old_order[4]
        conn.execute(
            INSERT_SQL,
            (duplicate["event_id"], "OrderAccepted", restaurants[0], None, None,
             json.dumps(payload("OrderAccepted", restaurant_id=restaurants[0],
                                order_id=uuid.uuid4()))),
        )  # fmt: skip
        for item in pending[2:]:
            enqueue(conn, item)
        # Publishers as 0005 left them (a row per partition): one done, one
        # behind in the second partition, one that never delivered anything.
        for name, behind in (
            ("done", {}),
            ("behind", {second: 2}),
            ("fresh", dict.fromkeys(range(64), 0)),
        ):
            for partition in range(64):
                position = behind.get(partition, counters.get(partition, 0))
                conn.execute(
                    "INSERT INTO relay_publisher_offsets (publisher, partition, position)"
                    " VALUES (%s, %s, %s)",
                    (name, partition, position),
                )
        conn.execute(
            "UPDATE relay_sla_offsets SET position = %s WHERE partition = %s",
            (counters[first], first),
        )
        conn.execute(
            "UPDATE relay_sla_offsets SET position = %s WHERE partition = %s",
            (counters[third], third),
        )  # the second partition is untouched: the SLA follower resumes at its first event
        conn.execute(
            "INSERT INTO relay_publisher_dead_letters (publisher, event_id, partition, position,"
            " event_type, reason) VALUES ('done', %s, %s, 1, 'OrderAccepted', 'too large')",
            (old_order[0]["event_id"], first),
        )

    assert migrate(url) == [m.name for m in migrations() if m.name > LAST_LOG_MIGRATION]

    async def check() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            assert await event_log.head(conn) == event_log.Head(0, -1)
            for limit in (3, 1000):
                events, rejected = await _read_log(conn, ORIGIN, 0, limit=limit)
                assert not rejected
                assert [uuid.UUID(e.event_id) for e in events] == [r["event_id"] for r in old_order]
                assert {e.at.window for e in events} == {0}
                for got, was in zip(events, old_order, strict=True):
                    # Re-rendered from the moved payload: the very same bytes.
                    assert got.data == was["rendered"], was["event_type"]
                    assert list(got.channels) == was["channels"], was["event_type"]
                    assert got.sse_event == was["sse_event"]
                    assert got.occurred_on_utc == was["occurred_on_utc"]
            window_zero = events
            for restaurant in restaurants:
                mine, _ = await _read_log(
                    conn, ORIGIN, 0, selector=Selector(restaurants=(restaurant,)), limit=4
                )
                assert [uuid.UUID(e.event_id) for e in mine] == [
                    r["event_id"] for r in old_order if r["restaurant_id"] == restaurant
                ]

            # Followers: the check is done with window 0; publishers and the
            # SLA follower resume at their first undelivered retained event.
            assert await event_log.read_offset(conn, "relay.check") == Position.end_of(0)
            assert await event_log.read_offset(conn, "publisher:done") == Position.end_of(0)
            by_old = {str(r["event_id"]): (r["partition"], r["position"]) for r in old_order}
            for follower, offsets in (
                ("publisher:behind", {p: counters[p] for p in counters} | {second: 2}),
                ("publisher:fresh", dict.fromkeys(counters, 0)),
                ("relay.sla", {first: counters[first], second: 0, third: counters[third]}),
            ):
                offset = await event_log.read_offset(conn, follower)
                assert offset is not None, follower
                resumed, _ = await _read_log(conn, offset, 0, limit=5)
                due = [
                    e for e in window_zero if by_old[e.event_id][1] > offsets[by_old[e.event_id][0]]
                ]
                assert resumed[0].event_id == due[0].event_id, follower
                assert {e.event_id for e in due} <= {e.event_id for e in resumed}, follower
            (kept,) = await (
                await conn.execute("SELECT count(*) FROM relay_publisher_dead_letters")
            ).fetchall()
            assert kept == (1,)

            # The pending rows are the first window recorded after the upgrade.
            cur = await conn.execute(query("record_window"))
            assert (await cur.fetchone() or (None,))[0] == 1
            fresh, rejected = await _read_log(conn, Position.end_of(0), 1, limit=2)
            assert not rejected
            assert [e.event_id for e in fresh] == [str(p.event_id) for p in pending]
            assert {e.at.window for e in fresh} == {1}
            everything, _ = await _read_log(conn, ORIGIN, 1)
            ids = [e.event_id for e in everything]
            assert len(ids) == len(set(ids)) == len(retained) + len(pending)
        finally:
            await conn.close()

    asyncio.run(check())


async def _read_log(
    conn: psycopg.AsyncConnection[Any],
    after: Position,
    through: int,
    *,
    selector: Selector = EVERYTHING,
    limit: int = 1000,
) -> tuple[list[LogEvent], list[Rejected]]:
    events: list[LogEvent] = []
    rejected: list[Rejected] = []
    while after < Position.end_of(through):
        page = await event_log.read(conn, after, through, selector=selector, limit=limit)
        events += page.events
        rejected += page.rejected
        after = page.reached
    return events, rejected
