"""Rows a careless or hostile producer can write, through a real `relay run`.

Black box: rows go in as the producer's plain SQL ``INSERT`` (SPEC §2), and
what comes out is read from SSE streams and from ``relay dead-letters list
--json``. PostgreSQL accepts far more than any client can load or any
dashboard should receive (±infinity, year 10000, JSON nested thousands deep,
numbers with thousands of digits, megabyte strings): each such row must
become a dead letter with a reason that names what is wrong, never stop the
relay, and never hold back later rows. An order id reused by another
restaurant must never reach the order's customer nor take the order away.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from psycopg import sql

from relay.gateway.auth import mint_token
from tests.helpers.db import Databases
from tests.helpers.orders import payload
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.helpers.sse import Subscriber, client

# The producer's INSERT: exactly the eight contract columns, every value as
# the producer spells it (the time as a literal PostgreSQL parses itself).
PRODUCER_INSERT = (
    "INSERT INTO relay_outbox (event_id, event_type, schema_version, restaurant_id, order_id,"
    " customer_id, payload, occurred_on_utc)"
    " VALUES (%s, %s, 1, %s, %s, %s, %s::text::jsonb, %s::text::timestamptz)"
)
NOW = "2026-01-15 12:00:00+00"
SETTLE = 0.7  # seconds to wait for a frame that must not come


@dataclass
class Row:
    """One outbox row as a producer writes it; ``body`` is raw JSON text."""

    event_type: str
    restaurant: uuid.UUID
    body: str
    order: uuid.UUID | None = None
    customer: uuid.UUID | None = None
    occurred: str = NOW
    event_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        self.event_id = self.event_id or uuid.uuid4()

    @property
    def id(self) -> str:
        return str(self.event_id)


def row(
    event_type: str,
    restaurant: uuid.UUID,
    order: uuid.UUID | None = None,
    *,
    customer: uuid.UUID | None = None,
    occurred: str = NOW,
    payload_only: bool = False,
    **changes: Any,
) -> Row:
    """A valid row of ``event_type`` (payload from the test helpers), with
    ``changes`` applied to its payload; ``payload_only`` leaves the
    ``order_id`` column NULL while the payload still names the order."""
    order = order or uuid.uuid4()
    body = payload(event_type, restaurant_id=restaurant, order_id=order)
    body.update(changes)
    column = None if payload_only else order
    return Row(event_type, restaurant, json.dumps(body), column, customer, occurred)


def raw(base: Row, body: str) -> Row:
    """``base`` with its payload replaced by raw JSON text (what json.dumps won't write)."""
    return Row(base.event_type, base.restaurant, body, base.order, base.customer, base.occurred)


def produce(url: str, *rows: Row, timezone: str | None = None) -> None:
    """Each row in its own committed transaction, in order."""
    with psycopg.connect(url, autocommit=True) as conn:
        if timezone:
            conn.execute(sql.SQL("SET TimeZone = {}").format(sql.Literal(timezone)))
        for r in rows:
            conn.execute(
                PRODUCER_INSERT,
                (r.event_id, r.event_type, r.restaurant, r.order, r.customer, r.body, r.occurred),
            )


def dead_letters(url: str) -> dict[str, str]:
    """event id → reason, from ``relay dead-letters list --json`` (the operator's view)."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "dead-letters", "list", "--json", "--limit", "10000"],
        env={**os.environ, "DATABASE_URL": url}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return {entry["event_id"]: entry["reason"] for entry in json.loads(result.stdout)}


def staff(*restaurants: uuid.UUID) -> str:
    return mint_token(SECRET, subject="staff", restaurant_ids=list(restaurants))


def customer_token(customer: uuid.UUID) -> str:
    return mint_token(SECRET, subject=str(customer), restaurant_ids=[])


def ids(sub: Subscriber) -> list[str]:
    return [json.loads(f.data)["eventId"] for f in sub.events]


def data_of(sub: Subscriber) -> dict[str, dict[str, Any]]:
    return {(d := json.loads(f.data))["eventId"]: d for f in sub.events}


async def watch(
    http: httpx.AsyncClient, url: str, token: str, last_id: str | None = None
) -> Subscriber:
    """An SSE subscriber that has been answered (and, if 200, is subscribed)."""
    sub = Subscriber(http, url, token, last_id=last_id).start()
    await asyncio.wait_for(sub.ready.wait(), 15)
    return sub


async def receive(sub: Subscriber, count: int) -> list[str]:
    """The event ids of ``sub`` once ``count`` arrived, after a pause for extras."""
    await sub.wait_for(count, timeout=20)
    await asyncio.sleep(SETTLE)
    return ids(sub)


def assert_alive(relay: RelayProcess) -> None:
    assert relay.proc is not None and relay.proc.poll() is None, relay.output()[-3000:]
    ready = httpx.get(f"{relay.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text


def assert_specific(reason: str, *words: str) -> None:
    """A reason an operator can act on: short, naming what is wrong, not a crash."""
    assert len(reason) < 1000, reason[:300]
    assert not reason.lower().startswith("internal error"), reason
    for word in words:
        assert word in reason, (word, reason)


async def test_unloadable_occurred_on_utc_is_a_dead_letter_and_never_stops_the_relay(
    databases: Databases,
) -> None:
    """±infinity and year-10000 times used to fail the whole read on load (a
    crash loop holding up every restaurant); now each is a dead letter and the
    rows around it flow. The database's default zone is east of UTC, so the
    relay loads the last microsecond of 9999 only if its sessions run in UTC."""
    url = databases.create()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Tokyo'").format(
                    sql.Identifier(conn.info.dbname)
                )
            )
        await _unloadable_times(url)
    finally:
        databases.drop(url)


async def _unloadable_times(url: str) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    a1, a2, a3, a4 = (row("OrderAccepted", a) for _ in range(4))
    b1, b3 = row("OrderAccepted", b), row("OrderAccepted", b)
    b2 = row("OrderPaymentSucceeded", b, occurred="0001-01-01 00:00:00+00")  # first loadable
    bad = [
        row("OrderAccepted", a, occurred="-infinity"),
        row("OrderAccepted", a, occurred="infinity"),
        row("OrderAccepted", a, occurred="10000-01-01 00:00:00+00"),
        # Year 9999 as written, year 10000 in UTC.
        row("OrderAccepted", a, occurred="9999-12-31 23:30:00-01"),
    ]
    last_of_9999 = row("OrderPaymentSucceeded", a, occurred="9999-12-31 23:59:59.999999+00")

    started: list[RelayProcess] = []

    def start() -> RelayProcess:
        started.append(RelayProcess(url, env={"RELAY_HEARTBEAT_SECONDS": "1"}))
        return started[-1].start()

    relay = start()
    try:
        async with client() as http:
            stream_a = await watch(http, f"{relay.url}/v1/restaurants/{a}/stream", staff(a))
            stream_b = await watch(http, f"{relay.url}/v1/restaurants/{b}/stream", staff(b))
            await asyncio.to_thread(
                produce, url, a1, bad[0], b1, a2, bad[1], b2, a3, bad[2], b3, bad[3], a4
            )
            await asyncio.to_thread(produce, url, last_of_9999, timezone="Asia/Tokyo")
            got_a, got_b = await asyncio.gather(receive(stream_a, 5), receive(stream_b, 3))
            await stream_a.close()
            await stream_b.close()
        assert got_a == [a1.id, a2.id, a3.id, a4.id, last_of_9999.id]
        assert got_b == [b1.id, b2.id, b3.id]
        shown = data_of(stream_a)[last_of_9999.id]["occurredOnUtc"]
        assert shown == "9999-12-31T23:59:59.999999Z"
        assert_alive(relay)
        reasons = dead_letters(url)
        assert set(reasons) == {r.id for r in bad}
        for r in bad:
            assert_specific(reasons[r.id], "occurred_on_utc", "outside the years 1 to 9999")
        resume_at = stream_a.last_id

        # A relay starting with such a row pending comes up and publishes past it.
        relay.stop()
        later_bad, a5 = row("OrderAccepted", a, occurred="-infinity"), row("OrderAccepted", a)
        produce(url, later_bad, a5)
        relay = start()
        async with client() as http:
            resumed = await watch(
                http, f"{relay.url}/v1/restaurants/{a}/stream", staff(a), last_id=resume_at
            )
            got = await receive(resumed, 1)
            await resumed.close()
        assert got == [a5.id]
        assert_alive(relay)
        assert_specific(dead_letters(url)[later_bad.id], "occurred_on_utc")
    finally:
        for proc in started:
            proc.__exit__()


async def test_the_first_loadable_time_is_broadcast_as_iso_8601(relay: RelayProcess) -> None:
    """0001-01-01 is .NET's DateTime.MinValue, what a producer that forgot to
    set the time writes. It is loadable, so it is published, and its
    occurredOnUtc must still be ISO-8601 (four-digit year) for clients to parse."""
    r = uuid.uuid4()
    first = row("OrderPaymentSucceeded", r, occurred="0001-01-01 00:00:00+00")
    async with client() as http:
        stream = await watch(http, f"{relay.url}/v1/restaurants/{r}/stream", staff(r))
        await asyncio.to_thread(produce, relay.database_url, first)
        got = await receive(stream, 1)
        await stream.close()
    assert got == [first.id]
    assert data_of(stream)[first.id]["occurredOnUtc"] == "0001-01-01T00:00:00Z"


async def test_payloads_python_cannot_decode_are_dead_letters_naming_why(
    relay: RelayProcess,
) -> None:
    """JSON nested deeper than Python's recursion limit, an integer past its
    4,300-digit conversion limit and a time that is year 10000 in UTC are
    valid to PostgreSQL; they used to end as "internal error" (or worse)."""
    r = uuid.uuid4()
    base = row("OrderPaymentSucceeded", r)
    depth = 10_000  # PostgreSQL's default max_stack_depth refuses ~15,000
    deep = raw(base, base.body[:-1] + ', "notes": ' + "[" * depth + "]" * depth + "}")
    digits = raw(base, base.body.replace('"total": "42.50"', '"total": ' + "9" * 5000))
    assert digits.body != base.body
    late = row("OrderPaymentSucceeded", r, lastUpdateTimestamp="9999-12-31T23:00:00-05:00")
    sentinel = row("OrderAccepted", r)
    async with client() as http:
        stream = await watch(http, f"{relay.url}/v1/restaurants/{r}/stream", staff(r))
        await asyncio.to_thread(produce, relay.database_url, deep, digits, late, sentinel)
        got = await receive(stream, 1)
        await stream.close()
    assert got == [sentinel.id]
    reasons = dead_letters(relay.database_url)
    assert_specific(reasons[deep.id], "nested too deeply")
    assert_specific(reasons[digits.id], "digits")
    assert_specific(reasons[late.id], "lastUpdateTimestamp", "outside the years 1 to 9999")
    assert_alive(relay)


async def test_an_order_id_reused_by_another_restaurant_never_reaches_the_orders_customer(
    relay: RelayProcess,
) -> None:
    """The order's stream belongs to the restaurant and customer of its first
    event. Another restaurant writing the same order id reaches its own
    kitchen stream, never the owner's order stream, live or on resume, and
    takes the order from no one. Routing follows the order_id column: a row
    naming the order only in its payload reaches no order stream at all."""
    a, c, d, ox = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    b = uuid.uuid4()  # B shares A's log (there is one): only routing tells them apart
    url = relay.database_url
    first = row("OrderPaymentSucceeded", a, ox, customer=c)
    accepted = row("OrderAccepted", a, ox, customer=c)
    only_payload = row("OrderAccepted", b, ox, customer=d, payload_only=True)
    own_payload_only = row("OrderPreparing", a, ox, customer=c, payload_only=True)
    reused = row("OrderPreparing", b, ox, customer=d)
    mismatched = row("OrderAccepted", b, ox, customer=d, orderId=str(uuid.uuid4()))
    preparing = row("OrderPreparing", a, ox, customer=c)
    order_stream = f"{relay.url}/v1/orders/{ox}/stream"

    async with client() as http:
        kitchen_a = await watch(http, f"{relay.url}/v1/restaurants/{a}/stream", staff(a))
        kitchen_b = await watch(http, f"{relay.url}/v1/restaurants/{b}/stream", staff(b))
        await asyncio.to_thread(produce, url, first)
        assert await receive(kitchen_a, 1) == [first.id]

        live = await watch(http, order_stream, customer_token(c))
        assert live.status == 200
        before = live.last_id  # a cursor from before any of B's rows
        await asyncio.to_thread(produce, url, accepted)
        await live.wait_for(1)
        await asyncio.to_thread(produce, url, only_payload, reused, mismatched, own_payload_only)
        got_b = await receive(kitchen_b, 2)
        await kitchen_a.wait_for(3)

        # B's rows are now the order id's latest: the order is still A's and C's.
        resumed = await watch(http, order_stream, customer_token(c), last_id=before)
        intruder = await watch(http, order_stream, customer_token(d))
        other_kitchen = await watch(http, order_stream, staff(b))
        await asyncio.to_thread(produce, url, preparing)
        got_live = await receive(live, 2)
        got_resumed = await receive(resumed, 2)
        got_a = await receive(kitchen_a, 4)
        for sub in (kitchen_a, kitchen_b, live, resumed, intruder, other_kitchen):
            await sub.close()

    assert got_live == [accepted.id, preparing.id]
    assert resumed.status == 200
    assert got_resumed == [accepted.id, preparing.id]
    assert {data["restaurantId"] for data in data_of(resumed).values()} == {str(a)}
    assert (intruder.status, intruder.events) == (403, [])
    assert (other_kitchen.status, other_kitchen.events) == (403, [])
    # B's kitchen gets both of B's rows; the payload's orderId is kept as data.
    assert got_b == [only_payload.id, reused.id]
    assert data_of(kitchen_b)[only_payload.id]["orderId"] == str(ox)
    # A row without the order_id column reaches its kitchen only, even A's own.
    assert got_a == [first.id, accepted.id, own_payload_only.id, preparing.id]
    assert_specific(dead_letters(url)[mismatched.id], "orderId")


async def test_oversized_and_odd_values_are_bounded_and_money_is_plain_decimal(
    relay: RelayProcess,
) -> None:
    """Every dashboard of a restaurant receives each frame, and every reason
    and log line is read by someone: a megabyte order number or event type
    is a dead letter with a short reason, money is finite and plain, and
    producers cannot forge the relay's own delay alerts."""
    r = uuid.uuid4()
    megabyte = "Q" * 1_000_000
    long_number = row("OrderPaymentSucceeded", r, orderNumber=megabyte)
    huge_text = row("OrderPaymentSucceeded", r, total="1e400")
    base = row("OrderPaymentSucceeded", r)
    huge_number = raw(base, base.body.replace('"total": "42.50"', '"total": 1e400'))
    assert huge_number.body != base.body
    exponent = row("OrderPaymentSucceeded", r, total="1E+2")
    big_type = Row(megabyte, r, row("OrderAccepted", r).body)
    order = uuid.uuid4()
    alert = {
        "orderId": str(order), "restaurantId": str(r), "orderNumber": "A-1",
        "kind": "NotAccepted", "expectedBy": "2026-01-15T12:00:00Z",
        "detectedAt": "2026-01-15T12:05:00Z",
    }  # fmt: skip
    forged = Row("OrderDelayAlert", r, json.dumps(alert), order)
    sentinel = row("OrderAccepted", r)
    async with client() as http:
        stream = await watch(http, f"{relay.url}/v1/restaurants/{r}/stream", staff(r))
        await asyncio.to_thread(
            produce, relay.database_url,
            long_number, huge_text, huge_number, exponent, big_type, forged, sentinel,
        )  # fmt: skip
        got = await receive(stream, 2)
        await stream.close()
    assert got == [exponent.id, sentinel.id]
    assert data_of(stream)[exponent.id]["total"] == "100"
    reasons = dead_letters(relay.database_url)
    assert_specific(reasons[long_number.id], "orderNumber: longer than 100 characters")
    assert_specific(reasons[huge_text.id], "total")
    assert_specific(reasons[huge_number.id], "total")
    assert_specific(reasons[big_type.id], "unknown event type")
    assert_specific(reasons[forged.id], "derived by the relay only")
    assert_alive(relay)
    # The relay's log quotes none of it in full: no line a log pipeline would choke on.
    output = relay.output()
    longest = max(output.splitlines(), key=len, default="")
    assert len(longest) <= 10_000, longest[:300]
    assert "Q" * 1000 not in output
