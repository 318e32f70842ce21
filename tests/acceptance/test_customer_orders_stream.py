"""A customer's orders in one stream: `GET /v1/me/orders/stream`.

The customer app follows every order whose ``customer_id`` is the token's
``sub`` (at any restaurant), including orders placed
after it connected, over a real `relay run`. An order is the customer's as
decided for order streams: the restaurant of its first event, and the first
customer named among that restaurant's events of it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.log import Position, customer_scope
from relay.outbox import OutboxEvent, enqueue
from tests.helpers.orders import CHAIN, event
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.helpers.sse import Subscriber, client, from_start

PATH = "/v1/me/orders/stream"


def customer_token(customer: uuid.UUID | str) -> str:
    return mint_token(SECRET, subject=str(customer))


def order_life(
    restaurant: uuid.UUID, customer: uuid.UUID, order: uuid.UUID | None = None
) -> list[OutboxEvent]:
    order = order or uuid.uuid4()
    return [
        event(name, restaurant_id=restaurant, order_id=order, customer_id=customer)
        for name in ("OrderPaymentSucceeded", *CHAIN)
    ]


def produce(url: str, events: list[OutboxEvent]) -> None:
    with psycopg.connect(url) as conn:
        for item in events:
            enqueue(conn, item)
            conn.commit()


def seen(sub: Subscriber) -> list[tuple[str, str]]:
    """(orderId, eventType) of every event the stream delivered, in order."""
    return [(json.loads(f.data)["orderId"], json.loads(f.data)["eventType"]) for f in sub.events]


def expected(events: list[OutboxEvent]) -> list[tuple[str, str]]:
    return [(str(e.order_id), e.event_type) for e in events]


def two_restaurants() -> tuple[uuid.UUID, uuid.UUID]:
    return uuid.uuid4(), uuid.uuid4()


@pytest.fixture
def relay(database_url: str) -> Iterator[RelayProcess]:
    with RelayProcess(database_url, env={"RELAY_HEARTBEAT_SECONDS": "1"}) as proc:
        yield proc


async def test_a_customer_gets_their_orders_and_only_theirs(
    relay: RelayProcess, database_url: str
) -> None:
    """Orders at two restaurants, one placed after the stream
    opened; another customer's orders and another restaurant's row that
    reuses the customer's order id and names them never appear."""
    a, b = two_restaurants()
    me, other = uuid.uuid4(), uuid.uuid4()
    before = order_life(a, me)
    await asyncio.to_thread(produce, database_url, before[:2])

    async with client() as http:
        # From the start of the log: the order placed before connecting too.
        cursor = from_start(customer_scope(me))
        mine = Subscriber(http, f"{relay.url}{PATH}", customer_token(me), last_id=cursor).start()
        theirs = Subscriber(http, f"{relay.url}{PATH}", customer_token(other)).start()
        for sub in (mine, theirs):
            await asyncio.wait_for(sub.ready.wait(), 10)
            assert sub.status == 200
        placed_later = order_life(b, me)
        spoof = event(
            "OrderCancelled",
            restaurant_id=b,  # not the order's restaurant: its first event was at a
            order_id=before[0].order_id,
            customer_id=me,
        )
        other_orders = order_life(a, other) + order_life(b, other)
        interleaved = [
            *before[2:3], other_orders[0], placed_later[0], spoof, *other_orders[1:6],
            *before[3:], *placed_later[1:], *other_orders[6:],
        ]  # fmt: skip
        await asyncio.to_thread(produce, database_url, interleaved)
        want = expected(before + placed_later)
        await mine.wait_for(len(want))
        await theirs.wait_for(len(other_orders))
        await asyncio.sleep(1.0)  # a stray or duplicate event would arrive now
        await mine.close()
        await theirs.close()

    got = seen(mine)
    assert sorted(got) == sorted(want)
    for order in (before[0].order_id, placed_later[0].order_id):  # each order in its own order
        assert [t for o, t in got if o == str(order)] == [t for o, t in want if o == str(order)]
    assert "OrderCancelled" not in {t for _o, t in got}, "another restaurant's row got through"
    assert sorted(seen(theirs)) == sorted(expected(other_orders))
    ids = [f.id for f in mine.events]
    assert len(set(ids)) == len(ids)
    assert all(Position.parse(i or "", customer_scope(me)) for i in ids)


async def test_resume_from_any_frame_is_exact(relay: RelayProcess, database_url: str) -> None:
    """Reconnecting with a frame's id replays exactly what followed it."""
    a, b = two_restaurants()
    me = uuid.uuid4()
    events = order_life(a, me) + order_life(b, me)
    await asyncio.to_thread(produce, database_url, events)
    start = from_start(customer_scope(me))
    async with client() as http:
        whole = Subscriber(http, f"{relay.url}{PATH}", customer_token(me), last_id=start).start()
        await whole.wait_for(len(events))
        await whole.close()
        cut = whole.events[3].id
        rest = Subscriber(http, f"{relay.url}{PATH}", customer_token(me), last_id=cut).start()
        await rest.wait_for(len(events) - 4)
        await asyncio.sleep(0.5)
        await rest.close()
    assert sorted(seen(whole)) == sorted(expected(events))
    assert seen(rest) == seen(whole)[4:]


async def test_another_streams_cursor_is_reset(relay: RelayProcess) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    async with client() as http:
        sub = Subscriber(
            http,
            f"{relay.url}{PATH}",
            customer_token(me),
            last_id=Position.end_of(1).encode(customer_scope(other)),
        ).start()
        await asyncio.wait_for(sub.ready.wait(), 10)
        await asyncio.sleep(0.3)
        await sub.close()
    assert sub.frames[0].event == "reset"
    assert "another stream" in (sub.frames[0].data or "")


def test_refusals(relay: RelayProcess) -> None:
    """401 without a valid token; 403 when the token's subject is not a customer id."""

    def status(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with (
            httpx.Client(timeout=5) as http,
            http.stream("GET", f"{relay.url}{PATH}", headers=headers) as response,
        ):
            return response.status_code

    assert status(None) == 401
    assert status("not-a-token") == 401
    assert status(customer_token("staff-member-7")) == 403
