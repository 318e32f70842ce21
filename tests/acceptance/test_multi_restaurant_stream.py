"""One SSE stream for several restaurants: `GET /v1/restaurants/stream`.

A manager of eight restaurants cannot hold eight EventSources (a browser
allows six connections per origin over HTTP/1.1), so one stream carries the
kitchen events of every restaurant the token grants, or of a ``?restaurant=``
subset, resumable by one cursor (a position in the log and the set's
fingerprint), over a real `relay run`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.log import Position, restaurant_set_scope
from relay.outbox import OutboxEvent, enqueue
from tests.helpers.orders import CHAIN, STATUS_OF, event
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.helpers.sse import Subscriber, client, prune_everything
from tests.helpers.sse import from_start as before_everything

AUDIENCE = "relay-dashboards"
ENV = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_JWT_AUDIENCE": AUDIENCE}


def staff(*restaurants: uuid.UUID, subject: str = "manager") -> str:
    return mint_token(SECRET, subject=subject, restaurant_ids=list(restaurants), audience=AUDIENCE)


def from_start(restaurants: list[uuid.UUID]) -> str:
    """The cursor of a set's stream before any event."""
    return before_everything(restaurant_set_scope(restaurants))


def four_restaurants() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID, uuid.UUID]:
    """A, B and C, and D: never granted, its events interleaved with theirs."""
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    return a, b, c, d


def chains(restaurants: list[uuid.UUID], orders: int) -> list[OutboxEvent]:
    """``orders`` order chains spread over ``restaurants``, their steps interleaved."""
    lives = [
        [
            event(name, restaurant_id=restaurants[i % len(restaurants)], order_id=order)
            for name in ("OrderPaymentSucceeded", *CHAIN)
        ]
        for i, order in enumerate(uuid.uuid4() for _ in range(orders))
    ]
    return [life[step] for step in range(len(lives[0])) for life in lives]


def produce(url: str, events: list[OutboxEvent], *, per_tx: int = 3) -> None:
    with psycopg.connect(url) as conn:
        for i, item in enumerate(events):
            enqueue(conn, item)
            if i % per_tx == per_tx - 1:
                conn.commit()
        conn.commit()


def identity(item: OutboxEvent) -> tuple[str, str, str]:
    return (
        str(item.restaurant_id),
        STATUS_OF.get(item.event_type, "Paid"),
        str(item.order_id),
    )


def received(sub: Subscriber) -> list[tuple[str, str, str]]:
    out = []
    for f in sub.events:
        data = json.loads(f.data)
        out.append((data["restaurantId"], data.get("newStatus") or data["status"], data["orderId"]))
    return out


def per_restaurant(items: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    by: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for item in items:
        by[item[0]].append(item)
    return dict(by)


@pytest.fixture
def relay(database_url: str) -> Iterator[RelayProcess]:
    with RelayProcess(database_url, env=ENV) as proc:
        yield proc


async def test_one_stream_carries_exactly_the_granted_restaurants_each_in_order(
    relay: RelayProcess, database_url: str
) -> None:
    """Three granted restaurants and a fourth, not granted, their events
    interleaved: the stream gets all of the three, each restaurant in commit
    order, none of the fourth; a ``?restaurant=`` subset gets only its own."""
    a, b, c, d = four_restaurants()
    token = staff(a, b, c)
    base = f"{relay.url}/v1/restaurants/stream"
    async with client() as http:
        whole = Subscriber(http, base, token).start()
        subset = Subscriber(http, f"{base}?restaurant={a}&restaurant={c}", token).start()
        for sub in (whole, subset):
            await asyncio.wait_for(sub.ready.wait(), 10)
            assert sub.status == 200
            assert sub.response_headers is not None
            assert sub.response_headers["content-type"].startswith("text/event-stream")
        # A fresh client gets a cursor naming its set before any event.
        assert whole.frames[0].id is not None
        assert Position.parse(whole.frames[0].id, restaurant_set_scope([a, b, c])).whole

        everything = chains([a, b, c, d], 40)  # 200 events, 50 per restaurant
        await asyncio.to_thread(produce, database_url, everything)
        mine = [identity(e) for e in everything if e.restaurant_id != d]
        await whole.wait_for(len(mine))
        await subset.wait_for(len([x for x in mine if x[0] in (str(a), str(c))]))
        await asyncio.sleep(1.0)  # a duplicate or a stray event would arrive now
        await whole.close()
        await subset.close()

    got = received(whole)
    assert len(got) == len(mine) == 150
    assert str(d) not in {r for r, _s, _o in got}
    assert per_restaurant(got) == per_restaurant(mine)  # each restaurant in commit order
    ids = [f.id for f in whole.events]
    assert len(set(ids)) == len(ids)
    assert "heartbeat" in whole.comments
    want_subset = [x for x in mine if x[0] in (str(a), str(c))]
    assert per_restaurant(received(subset)) == per_restaurant(want_subset)
    assert len(received(subset)) == len(want_subset)


def test_refusals(relay: RelayProcess) -> None:
    """Who may open which set: 401 without a token, 403 for no restaurant or
    one not granted, 400 for a malformed id or too many restaurants."""
    a, b, c, d = four_restaurants()
    base = f"{relay.url}/v1/restaurants/stream"
    many = [uuid.uuid4() for _ in range(101)]

    def call(url: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(timeout=5) as http, http.stream("GET", url, headers=headers) as r:
            if r.status_code != 200:
                r.read()
            return r

    three = staff(a, b, c)
    cases: dict[str, httpx.Response] = {
        "no token": call(base, None),
        "no restaurant granted": call(base, staff()),
        "not granted": call(f"{base}?restaurant={a}&restaurant={d}", three),
        "malformed id": call(f"{base}?restaurant={a}&restaurant=nope", three),
        "empty id": call(f"{base}?restaurant=", three),
        "too many asked": call(
            base + "?" + "&".join(f"restaurant={r}" for r in many), staff(*many)
        ),
        "token grants too many": call(base, staff(*many)),
        "a subset of a large grant": call(f"{base}?restaurant={many[0]}", staff(*many)),
        "granted": call(base, three),
        "granted subset": call(f"{base}?restaurant={b}", three),
        "repeated id": call(f"{base}?restaurant={b}&restaurant={b}", three),
    }
    assert [(n, r.status_code) for n, r in cases.items()] == [
        ("no token", 401),
        ("no restaurant granted", 403),
        ("not granted", 403),
        ("malformed id", 400),
        ("empty id", 400),
        ("too many asked", 400),
        ("token grants too many", 400),
        ("a subset of a large grant", 200),
        ("granted", 200),
        ("granted subset", 200),
        ("repeated id", 200),
    ]
    assert "at most 100" in cases["too many asked"].json()["error"]
    too_many = cases["token grants too many"].json()["error"]
    assert "at most 100" in too_many and "?restaurant=" in too_many


async def test_resume_gets_exactly_the_missed_events_across_replicas(database_url: str) -> None:
    """Disconnect mid-stream, events keep coming, reconnect to another replica
    with Last-Event-ID: exactly the missed events, none twice; at the very end
    (``?lastEventId=``) nothing at all."""
    a, b, c, d = four_restaurants()
    token = staff(a, b, c)
    path = "/v1/restaurants/stream"
    everything = chains([a, b, c, d], 60)  # 300 events, 225 of them ours
    mine = [identity(e) for e in everything if e.restaurant_id != d]
    with RelayProcess(database_url, env=ENV) as one, RelayProcess(database_url, env=ENV) as two:
        async with client() as http:
            first = Subscriber(http, one.url + path, token).start()
            await asyncio.wait_for(first.ready.wait(), 10)
            await asyncio.to_thread(produce, database_url, everything[:120])
            await first.wait_for(60)
            await first.close()  # mid-stream
            seen = list(first.events)
            assert 60 <= len(seen) < 120
            await asyncio.to_thread(produce, database_url, everything[120:200])

            assert seen[-1].id is not None
            second = Subscriber(http, two.url + path, token, last_id=seen[-1].id).start()
            await asyncio.wait_for(second.ready.wait(), 10)
            await asyncio.to_thread(produce, database_url, everything[200:])
            await second.wait_for(len(mine) - len(seen))
            await asyncio.sleep(1.0)
            await second.close()
            assert second.events
            third = Subscriber(
                http, f"{one.url}{path}?lastEventId={second.events[-1].id}", token
            ).start()
            await asyncio.wait_for(third.ready.wait(), 10)
            await asyncio.sleep(1.5)
            await third.close()

    got = received(first) + received(second)
    assert len(got) == len(mine)  # none twice, none lost
    assert per_restaurant(got) == per_restaurant(mine)
    assert third.status == 200 and third.events == []
    assert not [f for f in second.frames + third.frames if f.event == "reset"]


async def test_a_cursor_of_another_set_or_malformed_resets_then_goes_live(
    relay: RelayProcess, database_url: str
) -> None:
    """A cursor the stream cannot honour exactly (malformed, a one-restaurant
    cursor, another set's, ahead of the log, older than retention) answers
    ``event: reset`` with a cursor for this set, then live events."""
    a, b, c, _d = four_restaurants()
    token = staff(a, b, c)
    url = f"{relay.url}/v1/restaurants/stream"
    await asyncio.to_thread(produce, database_url, chains([a, c], 2))
    async with client() as http:
        subset = Subscriber(http, f"{url}?restaurant={a}", token, last_id=from_start([a])).start()
        await subset.wait_for(5)
        await subset.close()
        other_set = subset.events[-1].id  # a's events, a's cursor
        whole = Subscriber(http, url, token, last_id=from_start([a, b, c])).start()
        await whole.wait_for(10)
        await whole.close()
        assert len(whole.events) == 10  # nothing read yet: everything retained
        old = whole.events[0].id
        assert old is not None and other_set is not None
        assert await asyncio.to_thread(prune_everything, database_url) == 10
        scope = restaurant_set_scope([a, b, c])
        bad = {
            "malformed": "garbage",
            "a one-channel stream's cursor": Position.end_of(1).encode(),
            "another set": other_set,
            "a cursor of the partitioned log": f"v~{scope}.3-1",
            "ahead of the log": Position.end_of(10**15).encode(scope),
            "older than retention": old,
        }
        reasons = {}
        for name, cursor in bad.items():
            sub = Subscriber(http, url, token, last_id=cursor).start()
            await asyncio.wait_for(sub.ready.wait(), 10)
            await asyncio.sleep(0.2)
            assert sub.status == 200, name
            assert sub.frames and sub.frames[0].event == "reset", name
            reset = json.loads(sub.frames[0].data)
            reasons[name] = reset["reason"]
            assert Position.parse(reset["cursor"], scope).whole, name
            live = [event("OrderAccepted", restaurant_id=c)]
            await asyncio.to_thread(produce, database_url, live)
            got = await sub.wait_for(1)
            await sub.close()
            assert [json.loads(f.data)["orderId"] for f in got] == [str(live[0].order_id)], name
    assert "another stream" in reasons["another set"]
    assert "another stream" in reasons["a one-channel stream's cursor"]
    assert "malformed" in reasons["a cursor of the partitioned log"]
    assert "ahead" in reasons["ahead of the log"]
    assert "retention" in reasons["older than retention"]
