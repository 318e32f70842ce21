"""Issue 5: the SSE gateway over a real `relay run`, real HTTP clients, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.log import Position, restaurant_set_scope
from relay.outbox import OutboxEvent, enqueue
from tests.helpers.orders import CHAIN, STATUS_OF, event
from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames
from tests.helpers.sse import Subscriber, bulk_accepted, client, from_start, prune_everything

AUDIENCE = "relay-dashboards"


def staff(*restaurants: uuid.UUID, subject: str = "staff", ttl: int = 3600) -> str:
    return mint_token(
        SECRET, subject=subject, restaurant_ids=list(restaurants), ttl_seconds=ttl,
        audience=AUDIENCE,
    )  # fmt: skip


def produce(url: str, *events: OutboxEvent) -> None:
    with psycopg.connect(url) as conn:
        for item in events:
            enqueue(conn, item)
            conn.commit()


def chain(restaurant: uuid.UUID, customer: uuid.UUID | None = None) -> list[OutboxEvent]:
    """One order's lifecycle, paid to delivered: five events in causal order."""
    order = uuid.uuid4()
    return [
        event(name, restaurant_id=restaurant, order_id=order, customer_id=customer)
        for name in ("OrderPaymentSucceeded", *CHAIN)
    ]


def identity(frame_data: str) -> tuple[str, str]:
    """(status, order) of a frame: what a dashboard shows, and for which order."""
    data = json.loads(frame_data)
    return data.get("newStatus") or data["status"], data["orderId"]


def metric(relay: RelayProcess, name: str) -> float:
    text = httpx.get(f"{relay.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


@pytest.fixture
def relay(database_url: str) -> Iterator[RelayProcess]:
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_JWT_AUDIENCE": AUDIENCE}
    with RelayProcess(database_url, env=env) as proc:
        yield proc


def test_auth_table(relay: RelayProcess, database_url: str) -> None:
    mine, other, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    order_events = chain(mine, customer)[:1]
    order = order_events[0].order_id
    produce(database_url, *order_events)
    good = staff(mine)
    query_token = staff(mine, subject="query-user")
    now = int(time.time())
    expired = jwt.encode(
        {"sub": "s", "exp": now - 120, "aud": AUDIENCE, "restaurant_ids": [str(mine)]},
        SECRET, algorithm="HS256",
    )  # fmt: skip
    wrong_key = mint_token("another-secret-that-is-long-enough!!", subject="s",
                           restaurant_ids=[mine], audience=AUDIENCE)  # fmt: skip
    unsigned = jwt.encode(
        {"sub": "s", "exp": now + 600, "aud": AUDIENCE, "restaurant_ids": [str(mine)]},
        "", algorithm="none",
    )  # fmt: skip
    wrong_aud = mint_token(SECRET, subject="s", restaurant_ids=[mine], audience="elsewhere")
    no_exp = jwt.encode({"sub": "s", "aud": AUDIENCE, "restaurant_ids": [str(mine)]}, SECRET)
    owner = mint_token(SECRET, subject=str(customer), restaurant_ids=[], audience=AUDIENCE)
    stranger = mint_token(SECRET, subject=str(uuid.uuid4()), restaurant_ids=[], audience=AUDIENCE)

    stream = f"{relay.url}/v1/restaurants/{mine}/stream"
    order_stream = f"{relay.url}/v1/orders/{order}/stream"
    deadline = time.monotonic() + 15  # the order stream needs the order published
    while time.monotonic() < deadline:
        probe = httpx.get(f"{relay.url}/v1/restaurants/{mine}/events",
                          headers={"Authorization": f"Bearer {good}"})  # fmt: skip
        if probe.json()["events"]:
            break
        time.sleep(0.05)

    def call(url: str, *, bearer: str | None = None, cookie: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        cookies = {"relay_token": cookie} if cookie else None
        with (
            httpx.Client(cookies=cookies, timeout=5) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code != 200:
                response.read()
            return response

    cases: list[tuple[str, httpx.Response, int]] = [
        ("no token", call(stream), 401),
        ("malformed", call(stream, bearer="not.a.jwt"), 401),
        ("expired", call(stream, bearer=expired), 401),
        ("wrong key", call(stream, bearer=wrong_key), 401),
        ("alg none", call(stream, bearer=unsigned), 401),
        ("wrong audience", call(stream, bearer=wrong_aud), 401),
        ("no exp", call(stream, bearer=no_exp), 401),
        ("other restaurant", call(f"{relay.url}/v1/restaurants/{other}/stream", bearer=good), 403),
        ("customer not owning", call(order_stream, bearer=stranger), 403),
        ("unknown order", call(f"{relay.url}/v1/orders/{uuid.uuid4()}/stream", bearer=good), 403),
        ("valid staff", call(stream, bearer=good), 200),
        ("staff on the order", call(order_stream, bearer=good), 200),
        ("valid customer", call(order_stream, bearer=owner), 200),
        ("query token", call(f"{stream}?access_token={query_token}"), 200),
        ("cookie", call(stream, cookie=good), 200),
        ("bad restaurant id", call(f"{relay.url}/v1/restaurants/nope/stream", bearer=good), 400),
    ]
    assert [(name, r.status_code) for name, r, _ in cases] == [(n, c) for n, _, c in cases]
    for name, response, code in cases:
        if code == 401:
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), name
            assert response.json()["error"], name  # a specific reason, as JSON
    reasons = {name: r.json()["error"] for name, r, code in cases if code == 401}
    assert "expired" in reasons["expired"]
    assert "aud" in reasons["wrong audience"].lower()
    assert len(set(reasons.values())) >= 5  # each refusal says what was wrong

    # The query-string token, even a refused one, never reaches the logs.
    leaked = staff(other, subject="leaky")
    assert call(f"{stream}?access_token={leaked}").status_code == 403
    time.sleep(0.3)
    output = relay.output()
    assert query_token not in output and leaked not in output
    assert good not in output


async def test_frames_headers_retry_and_heartbeat(relay: RelayProcess) -> None:
    restaurant = uuid.uuid4()
    async with client() as http:
        sub = Subscriber(
            http, f"{relay.url}/v1/restaurants/{restaurant}/stream", staff(restaurant),
            headers={"Accept-Encoding": "gzip, br"},
        ).start()  # fmt: skip
        await asyncio.wait_for(sub.ready.wait(), 10)
        await asyncio.sleep(2.6)  # heartbeat is 1 s here
        await sub.close()
    assert sub.status == 200 and sub.response_headers is not None
    headers = sub.response_headers
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in headers  # never compressed, even when asked
    assert sub.first_chunk.startswith("retry: ")
    retry = int(sub.first_chunk.split("\n", 1)[0].removeprefix("retry: "))
    assert 2000 <= retry <= 4000  # 3 s with jitter
    # A fresh client gets a cursor before any event: the end of the log's newest window.
    assert sub.frames and sub.frames[0].id is not None
    assert Position.parse(sub.frames[0].id).whole
    assert sub.comments.count("heartbeat") >= 2


async def test_heartbeat_keeps_its_cadence_while_events_flow(
    relay: RelayProcess, database_url: str
) -> None:
    # SPEC §4: a comment heartbeat at least every RELAY_HEARTBEAT_SECONDS (1 s
    # here), even when events arrive more often than that.
    restaurant = uuid.uuid4()
    async with client() as http:
        sub = Subscriber(
            http, f"{relay.url}/v1/restaurants/{restaurant}/stream", staff(restaurant)
        ).start()
        await asyncio.wait_for(sub.ready.wait(), 10)
        with psycopg.connect(database_url) as conn:
            for _ in range(12):  # an event every 0.25 s for 3 s
                enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
                conn.commit()
                await asyncio.sleep(0.25)
        await asyncio.sleep(0.3)
        await sub.close()
    assert len([f for f in sub.frames if f.event]) == 12
    assert sub.comments.count("heartbeat") >= 2


async def test_stream_closes_when_its_token_expires(relay: RelayProcess) -> None:
    restaurant = uuid.uuid4()
    async with client() as http:
        sub = Subscriber(
            http, f"{relay.url}/v1/restaurants/{restaurant}/stream", staff(restaurant, ttl=3)
        ).start()
        await asyncio.wait_for(sub.ready.wait(), 10)
        assert sub.status == 200
        opened = time.monotonic()
        await asyncio.wait_for(sub.ended.wait(), 15)
    # exp is whole seconds, so the stream lasts at most the token's 3 s (+ slack).
    assert time.monotonic() - opened < 6
    assert any("token expired" in c for c in sub.comments)


async def test_tenant_isolation_ten_restaurants_three_subscribers(
    relay: RelayProcess, database_url: str
) -> None:
    restaurants = [uuid.uuid4() for _ in range(10)]
    async with client(connections=40) as http:
        subs = {
            r: [
                Subscriber(http, f"{relay.url}/v1/restaurants/{r}/stream", staff(r)).start()
                for _ in range(3)
            ]
            for r in restaurants
        }
        for group in subs.values():
            for sub in group:
                await asyncio.wait_for(sub.ready.wait(), 10)
                assert sub.status == 200

        # 1,000 events: 200 order chains interleaved across restaurants, in
        # transactions of a few events each, as a busy order service commits.
        chains = [chain(restaurants[i % 10]) for i in range(200)]
        expected: dict[uuid.UUID, list[tuple[str, str]]] = defaultdict(list)

        def write() -> None:
            with psycopg.connect(database_url) as conn:
                for step in range(5):
                    for i, events in enumerate(chains):
                        item = events[step]
                        enqueue(conn, item)
                        expected[item.restaurant_id].append(
                            (STATUS_OF.get(item.event_type, "Paid"), str(item.order_id))
                        )
                        if i % 7 == 6:
                            conn.commit()
                    conn.commit()

        await asyncio.to_thread(write)
        for r, group in subs.items():
            for sub in group:
                await sub.wait_for(len(expected[r]))
        for group in subs.values():
            for sub in group:
                await sub.close()

    assert sum(len(v) for v in expected.values()) == 1000
    for r, group in subs.items():
        for sub in group:
            got = [identity(f.data) for f in sub.events]
            assert got == expected[r]  # exactly its own, in commit order, nothing foreign
            assert all(json.loads(f.data)["restaurantId"] == str(r) for f in sub.events)
            ids = [f.id for f in sub.events]
            assert len(set(ids)) == len(ids)


async def test_resume_exact_continuation_across_replicas(database_url: str) -> None:
    restaurant = uuid.uuid4()
    token = staff(restaurant)
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_JWT_AUDIENCE": AUDIENCE}
    with RelayProcess(database_url, env=env) as a, RelayProcess(database_url, env=env) as b:
        path = f"/v1/restaurants/{restaurant}/stream"
        everything = [e for _ in range(40) for e in chain(restaurant)]  # 200 events
        async with client() as http:
            first = Subscriber(http, a.url + path, token).start()
            await asyncio.wait_for(first.ready.wait(), 10)
            await asyncio.to_thread(produce, database_url, *everything[:100])
            await first.wait_for(60)
            await first.close()  # mid-stream
            seen = list(first.events)
            assert 60 <= len(seen) <= 100
            await asyncio.to_thread(produce, database_url, *everything[100:150])

            # Reconnect to the other replica with the header...
            second = Subscriber(http, b.url + path, token, last_id=seen[-1].id).start()
            await second.wait_for(150 - len(seen))
            await asyncio.to_thread(produce, database_url, *everything[150:])
            await second.wait_for(200 - len(seen))
            await second.close()
            # ...and once more with the query parameter, at the very end: nothing.
            third = Subscriber(
                http, f"{a.url}{path}?lastEventId={second.events[-1].id}", token
            ).start()
            await asyncio.sleep(1.5)
            await third.close()

    got = [identity(f.data) for f in seen + second.events]
    want = [(STATUS_OF.get(e.event_type, "Paid"), str(e.order_id)) for e in everything]
    assert got == want  # the exact continuation
    assert len({f.id for f in seen + second.events}) == 200
    assert third.events == []  # nothing replayed twice


async def test_resumes_among_recent_events_replay_from_memory_as_the_log_would(
    database_url: str,
) -> None:
    """A resume among the hub's recent events is served from memory (no read
    of the log, no rendering): byte for byte what a replica replaying from
    the log sends, then live with nothing missed or repeated; also for a
    multi-restaurant stream, whose ids carry its fingerprint, and for a
    customer's order stream (found in its restaurant's memory)."""
    one, other, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_JWT_AUDIENCE": AUDIENCE}
    mixed = [
        e
        for i in range(6)
        for r in (one, other)
        for e in chain(r, customer if (i, r) == (2, one) else None)
    ]  # 30 events each
    order = mixed[20].order_id  # the customer's, at restaurant one
    owner = mint_token(SECRET, subject=str(customer), restaurant_ids=[], audience=AUDIENCE)
    path = f"/v1/restaurants/{one}/stream"
    several = f"/v1/restaurants/stream?restaurant={one}&restaurant={other}"
    with (
        RelayProcess(database_url, env=env) as memory,
        RelayProcess(database_url, ("--gateway-only",), {**env, "RELAY_REPLAY_MEMORY": "0"}) as log,
    ):
        relays = {"memory": memory, "log": log}
        await asyncio.to_thread(produce, database_url, *mixed)
        got: dict[str, list[tuple[str | None, str | None, str]]] = {}
        order_recalled: dict[str, float] = {}
        async with client() as http:
            joined: dict[str, Subscriber] = {}
            for name, relay in relays.items():
                whole = Subscriber(http, relay.url + path, staff(one), last_id=from_start())
                first = await whole.start().wait_for(30)
                await whole.close()
                resumed = Subscriber(http, relay.url + path, staff(one), last_id=first[9].id)
                rest = await resumed.start().wait_for(20)
                await resumed.close()
                got[name] = [(f.id, f.event, f.data) for f in first + rest]
                mine = f"{relay.url}/v1/orders/{order}/stream"
                whole = Subscriber(http, mine, owner, last_id=from_start())
                first = await whole.start().wait_for(5)
                await whole.close()
                recalled = metric(relay, 'relay_replayed_events_total{source="memory"}')
                resumed = Subscriber(http, mine, owner, last_id=first[1].id)
                await resumed.start().wait_for(3)
                await asyncio.sleep(0.3)  # a repeat would arrive now
                await resumed.close()
                order_recalled[name] = (
                    metric(relay, 'relay_replayed_events_total{source="memory"}') - recalled
                )
                got[name + " order"] = [(f.id, f.event, f.data) for f in first + resumed.events]
                # A set's cursor: the reset a placeholder cursor gets, at the head.
                joined[name] = Subscriber(http, relay.url + several, staff(one, other),
                                          last_id="join").start()  # fmt: skip
                await asyncio.wait_for(joined[name].ready.wait(), 10)
            await asyncio.sleep(0.5)
            for sub in joined.values():
                await sub.close()
            late = [*chain(one), *chain(other)]
            await asyncio.to_thread(produce, database_url, *late)
            await asyncio.sleep(1.0)  # recorded, and in the memory relay's hub
            for name, relay in relays.items():
                cursor = joined[name].frames[0]
                assert cursor.event == "reset"
                again = Subscriber(http, relay.url + several, staff(one, other),
                                   last_id=cursor.id).start()  # fmt: skip
                await again.wait_for(10)
                await asyncio.sleep(0.3)  # a repeat would arrive now
                await again.close()
                got[name + " set"] = [(f.id, f.event, f.data) for f in again.events]
        from_memory = metric(memory, 'relay_replayed_events_total{source="memory"}')
        read_back = metric(memory, 'relay_replayed_events_total{source="log"}')
        assert metric(log, 'relay_replayed_events_total{source="memory"}') == 0
        # The resume and the set's replay at least (a first stream from the
        # start may join the hub live, if it has not moved yet).
        assert metric(log, 'relay_replayed_events_total{source="log"}') >= 30
    assert got["memory"] == got["log"]  # the same bytes, from memory or from the log
    assert len(got["memory"]) == 50
    assert [d for _, _, d in got["memory"][30:]] == [d for _, _, d in got["memory"][10:30]]
    assert got["memory set"] == got["log set"]
    assert got["memory order"] == got["log order"]
    assert order_recalled == {"memory": 3, "log": 0}  # from its restaurant's memory
    assert [identity(d)[1] for _, _, d in got["memory order"]] == [str(order)] * 8
    want = [(STATUS_OF.get(e.event_type, "Paid"), str(e.order_id)) for e in late]
    assert [identity(d) for _, _, d in got["memory set"]] == want  # once each, in order
    assert from_memory >= 30 and read_back == 0


async def test_a_replica_reads_the_log_only_while_streams_follow_it(
    database_url: str,
) -> None:
    """Another replica records everything here (--dispatcher-only); the
    gateway reads nothing back while no stream follows it, and a stream that
    arrives later still gets every event, once, in order."""
    quiet, busy = uuid.uuid4(), uuid.uuid4()
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_JWT_AUDIENCE": AUDIENCE}
    with (
        RelayProcess(database_url, ("--dispatcher-only",)) as recorder,
        RelayProcess(database_url, ("--gateway-only",), env) as gateway,
    ):
        events_url = f"{gateway.url}/v1/restaurants/{quiet}/events"
        auth = {"Authorization": f"Bearer {staff(quiet)}"}
        before = httpx.get(events_url, headers=auth, timeout=5).json()["next"]
        early = [e for _ in range(4) for e in chain(quiet)]  # 20
        await asyncio.to_thread(produce, database_url, *early)
        deadline = time.monotonic() + 15
        while len(httpx.get(events_url, headers=auth, timeout=5).json()["events"]) < 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # the hub's sweep has passed the new windows
        # Nobody here followed the log: nothing was read back.
        assert metric(gateway, "relay_hub_read_back_events_total") == 0

        async with client() as http:
            path = f"/v1/restaurants/{quiet}/stream"
            watcher = Subscriber(
                http, f"{gateway.url}/v1/restaurants/{busy}/stream", staff(busy)
            ).start()
            fresh = Subscriber(http, gateway.url + path, staff(quiet)).start()
            resumed = Subscriber(http, gateway.url + path, staff(quiet), last_id=before).start()
            await resumed.wait_for(20)  # the skipped events, replayed from the log
            for sub in (watcher, fresh):
                await asyncio.wait_for(sub.ready.wait(), 10)
            late = chain(quiet) + chain(busy)
            await asyncio.to_thread(produce, database_url, *late)
            await resumed.wait_for(25)
            await fresh.wait_for(5)
            await watcher.wait_for(5)
            await asyncio.sleep(0.5)  # a duplicate would arrive now
            for sub in (watcher, fresh, resumed):
                await sub.close()
        # Now streams follow it: the hub read back what the other replica recorded.
        assert metric(gateway, "relay_hub_read_back_events_total") == 10
        assert recorder.proc is not None and recorder.proc.poll() is None
    want = [(STATUS_OF.get(e.event_type, "Paid"), str(e.order_id)) for e in early + late[:5]]
    assert [identity(f.data) for f in resumed.events] == want
    assert [identity(f.data) for f in fresh.events] == want[20:]  # live only, no history
    assert [identity(f.data) for f in watcher.events] == [
        (STATUS_OF.get(e.event_type, "Paid"), str(e.order_id)) for e in late[5:]
    ]


async def test_bogus_and_expired_cursors_reset_then_go_live(
    relay: RelayProcess, database_url: str
) -> None:
    restaurant = uuid.uuid4()
    token = staff(restaurant)
    url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
    await asyncio.to_thread(produce, database_url, *chain(restaurant))
    async with client() as http:
        warm = Subscriber(http, url, token, last_id=from_start()).start()
        old = (await warm.wait_for(5))[0].id
        await warm.close()
        # Retention removes the whole history; the old cursor is now unservable.
        assert await asyncio.to_thread(prune_everything, database_url) == 5

        ahead = Position.end_of(10**15).encode()
        reasons = {}
        for bad in ("garbage", ahead, old):
            sub = Subscriber(http, url, token, last_id=bad).start()
            await asyncio.wait_for(sub.ready.wait(), 10)
            await asyncio.sleep(0.2)
            assert sub.status == 200, bad
            assert sub.frames and sub.frames[0].event == "reset", bad
            reasons[bad] = json.loads(sub.frames[0].data)["reason"]
            assert reasons[bad], bad
            live = chain(restaurant)[:1]
            await asyncio.to_thread(produce, database_url, *live)
            got = await sub.wait_for(1)
            await sub.close()
            assert [json.loads(f.data)["orderId"] for f in got] == [str(live[0].order_id)], bad
        assert "malformed" in reasons["garbage"]
        assert "ahead of the log" in reasons[ahead]
        assert "older than the retention" in reasons[old]


async def test_cursors_of_the_partitioned_log_reset_then_go_live(
    relay: RelayProcess, database_url: str
) -> None:
    """Cursors of the log before snapshot windows (``3-17``, vector ``v.``
    cursors, with or without a set's fingerprint) name partitions that no
    longer exist: every stream kind, and the polling page, answers them with
    a reset, and the stream then goes live."""
    restaurant, other = uuid.uuid4(), uuid.uuid4()
    token = staff(restaurant, other)
    admin = mint_token(SECRET, subject="admin", roles=["admin"], audience=AUDIENCE)
    scope = restaurant_set_scope([restaurant, other])
    kitchen = f"{relay.url}/v1/restaurants/{restaurant}/stream"
    manager = f"{relay.url}/v1/restaurants/stream"
    everything = f"{relay.url}/v1/admin/stream"
    # (stream, token, its cursors' scope, an old cursor)
    cases = [
        (kitchen, token, "", "3-17"),
        (kitchen, token, "", "v.3-17"),
        (manager, token, scope, "v.3-17"),
        (manager, token, scope, f"v~{scope}.3-17.12-5"),
        (everything, admin, "", "v.3-17.12-5"),
        (everything, admin, "", "3-0"),
    ]
    async with client() as http:
        subs = [
            Subscriber(http, url, bearer, last_id=old).start() for url, bearer, _s, old in cases
        ]
        for sub, (url, _bearer, cursor_scope, old) in zip(subs, cases, strict=True):
            await asyncio.wait_for(sub.ready.wait(), 10)
            assert sub.status == 200, (url, old)
            assert sub.frames and sub.frames[0].event == "reset", (url, old)
            reset = json.loads(sub.frames[0].data)
            assert "malformed" in reset["reason"], (url, old)
            assert Position.parse(reset["cursor"], cursor_scope) == Position.parse(
                str(sub.frames[0].id), cursor_scope
            )
        kitchen_event = event("OrderAccepted", restaurant_id=restaurant)
        coupon = OutboxEvent(
            event_type="CouponUsed",
            payload={"couponId": str(uuid.uuid4()), "previousUsageCount": 0,
                     "newUsageCount": 1, "usedAt": "2026-11-25T12:00:00Z"},
            restaurant_id=other,
        )  # fmt: skip
        await asyncio.to_thread(produce, database_url, kitchen_event, coupon)
        for sub, (url, *_rest) in zip(subs, cases, strict=True):
            got = await sub.wait_for(1)
            await asyncio.sleep(0.1)
            await sub.close()
            want = "CouponUsed" if url == everything else "OrderStatusChanged"
            assert [f.event for f in got] == [want], url
    polled = httpx.get(
        f"{relay.url}/v1/restaurants/{restaurant}/events",
        params={"after": "3-17"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    ).json()
    assert "malformed" in polled["reset"]
    assert [e["event"] for e in polled["events"]] == ["OrderStatusChanged"]  # from the oldest


def test_polling_returns_the_stream_events_and_alternates_without_repeats(
    relay: RelayProcess, database_url: str
) -> None:
    restaurant = uuid.uuid4()
    token = staff(restaurant)
    auth = {"Authorization": f"Bearer {token}"}
    events_url = f"{relay.url}/v1/restaurants/{restaurant}/events"
    produce(database_url, *[e for _ in range(5) for e in chain(restaurant)])  # 25 events

    def poll(after: str | None, limit: int = 10) -> dict[str, object]:
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        response = httpx.get(events_url, params=params, headers=auth, timeout=5)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-cache"
        body: dict[str, object] = response.json()
        return body

    deadline = time.monotonic() + 15
    while len(poll(None, 100)["events"]) < 25:  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.05)

    first = poll(None)
    polled = list(first["events"])  # type: ignore[call-overload]
    assert len(polled) == 10
    # Switch to the stream with the polling cursor: the other 15, once each.
    resume = {**auth, "Last-Event-ID": str(first["next"])}
    stream_url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
    with httpx.stream("GET", stream_url, headers=resume, timeout=5) as r:
        tail, streamed = "", []
        for text in r.iter_text():
            frames, _comments, tail = parse_frames(tail + text)
            streamed += [f for f in frames if f.event]
            if len(streamed) >= 15:
                break
    assert len(streamed) == 15
    # Back to polling after the last streamed id: nothing new, nothing repeated.
    after_stream = poll(streamed[-1].id)
    assert after_stream["events"] == []
    # Its cursor moved on to where the log was read (positions are global).
    after_next = Position.parse(str(after_stream["next"]))
    assert after_next >= Position.parse(str(streamed[-1].id))
    assert poll(str(after_stream["next"]))["events"] == []
    # Same ids, names and JSON as the stream's frames.
    whole: list[dict[str, Any]] = poll(None, 100)["events"]  # type: ignore[assignment]
    assert [e["id"] for e in whole] == [e["id"] for e in polled] + [f.id for f in streamed]
    assert [e["event"] for e in whole][10:] == [f.event for f in streamed]
    assert [e["data"] for e in whole][10:] == [json.loads(f.data) for f in streamed]
    assert all("customerName" not in e["data"] for e in whole)

    # Bad input: clear 400s and the same auth as the stream.
    for bad in ("0", "-1", "x", "100000"):
        response = httpx.get(events_url, params={"limit": bad}, headers=auth)
        assert response.status_code == 400 and "limit" in response.json()["error"]
    assert httpx.get(events_url).status_code == 401
    other = staff(uuid.uuid4())
    assert httpx.get(events_url, headers={"Authorization": f"Bearer {other}"}).status_code == 403
    reset = poll("garbage", 100)
    assert reset["reset"] and len(reset["events"]) == 25  # type: ignore[arg-type]


async def test_slow_subscriber_is_closed_memory_stays_bounded_others_unaffected(
    database_url: str,
) -> None:
    restaurant = uuid.uuid4()
    token = staff(restaurant)
    env = {
        "RELAY_HEARTBEAT_SECONDS": "1",
        "RELAY_JWT_AUDIENCE": AUDIENCE,
        "RELAY_SUBSCRIBER_BUFFER": "1000",
    }
    total = 20_000
    with RelayProcess(database_url, env=env) as relay:
        assert relay.proc is not None
        path = f"/v1/restaurants/{restaurant}/stream"
        # The slow client: a tiny receive window, and it never reads.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", relay.port))
        stalled.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        async with client() as http:
            healthy = Subscriber(http, relay.url + path, token).start()
            await asyncio.wait_for(healthy.ready.wait(), 10)
            await asyncio.sleep(0.5)
            assert metric(relay, "relay_subscribers") == 2
            rss_before = rss_kib(relay.proc.pid)
            await asyncio.to_thread(bulk_accepted, database_url, restaurant, total)
            got = await healthy.wait_for(total, timeout=90)
            rss_after = rss_kib(relay.proc.pid)
            # The stalled stream is cut (overflow, then the stuck write times out).
            deadline = time.monotonic() + 30
            while metric(relay, "relay_subscribers") > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert metric(relay, "relay_subscribers") == 1
            assert metric(relay, "relay_slow_subscriber_disconnects_total") >= 1
            await healthy.close()
        stalled.close()

    numbers = [json.loads(f.data)["orderNumber"] for f in got]
    assert numbers == [f"B-{n}" for n in range(1, total + 1)]  # complete, in order
    # 20,000 events of ~400 bytes are ~8 MB: a buffer of them all would show.
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def fan_out(database_url: str, subscribers: int, events: int) -> None:
    restaurant = uuid.uuid4()
    token = staff(restaurant)
    env = {"RELAY_HEARTBEAT_SECONDS": "5", "RELAY_JWT_AUDIENCE": AUDIENCE}
    with RelayProcess(database_url, env=env) as relay:
        url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
        async with client(connections=subscribers + 10) as http:
            subs = [Subscriber(http, url, token).start() for _ in range(subscribers)]
            for sub in subs:  # "from now" means from the first cursor the stream sends
                await asyncio.wait_for(sub.ready.wait(), 60)
            assert {sub.status for sub in subs} == {200}
            await asyncio.to_thread(bulk_accepted, database_url, restaurant, events)
            deadline = time.monotonic() + 120
            for sub in subs:
                await sub.wait_for(events, timeout=max(0.0, deadline - time.monotonic()))
            for sub in subs:
                await sub.close()
        want = [f"B-{n}" for n in range(1, events + 1)]
        broken = [
            i for i, sub in enumerate(subs)
            if [json.loads(f.data)["orderNumber"] for f in sub.events] != want
        ]  # fmt: skip
        assert broken == [], relay.output()[-4000:]


async def test_many_subscribers_get_a_burst_complete_and_in_order(database_url: str) -> None:
    await fan_out(database_url, subscribers=200, events=100)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_thousand_subscribers_get_a_burst_of_500(database_url: str) -> None:
    await fan_out(database_url, subscribers=1000, events=500)


async def test_sigterm_with_100_open_streams_exits_zero_quickly(database_url: str) -> None:
    restaurants = [uuid.uuid4() for _ in range(10)]
    env = {"RELAY_HEARTBEAT_SECONDS": "15", "RELAY_SHUTDOWN_GRACE": "3s"}
    relay = RelayProcess(database_url, env=env).start()
    try:
        async with client(connections=120) as http:
            subs = [
                Subscriber(http, f"{relay.url}/v1/restaurants/{r}/stream",
                           mint_token(SECRET, subject=f"s{i}", restaurant_ids=[r])).start()
                for i, r in enumerate(restaurants * 10)
            ]  # fmt: skip
            for sub in subs:
                await asyncio.wait_for(sub.ready.wait(), 20)
            assert {sub.status for sub in subs} == {200}
            assert metric(relay, "relay_subscribers") == 100
            began = time.monotonic()
            relay.signal(15)
            assert relay.proc is not None
            code = await asyncio.to_thread(relay.proc.wait, 10)
            took = time.monotonic() - began
            await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in subs)), 5)
    finally:
        relay.__exit__()
    assert code == 0, relay.output()
    assert took < 5
    assert all(sub.ended.is_set() for sub in subs)  # every client saw its stream end


async def test_connection_caps_answer_429_and_free_on_disconnect(database_url: str) -> None:
    restaurant = uuid.uuid4()
    env = {
        "RELAY_HEARTBEAT_SECONDS": "1",
        "RELAY_MAX_CONNECTIONS": "3",
        "RELAY_MAX_CONNECTIONS_PER_SUBJECT": "2",
    }
    with RelayProcess(database_url, env=env) as relay:
        url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
        alice = mint_token(SECRET, subject="alice", restaurant_ids=[restaurant])
        bob = mint_token(SECRET, subject="bob", restaurant_ids=[restaurant])
        carol = mint_token(SECRET, subject="carol", restaurant_ids=[restaurant])
        async with client() as http:
            opened = [Subscriber(http, url, alice).start() for _ in range(2)]
            for sub in opened:
                await asyncio.wait_for(sub.ready.wait(), 10)
            third = await http.get(url, headers={"Authorization": f"Bearer {alice}"})
            assert third.status_code == 429 and int(third.headers["Retry-After"]) > 0
            assert "subject" in third.json()["error"]
            bobs = Subscriber(http, url, bob).start()
            await asyncio.wait_for(bobs.ready.wait(), 10)
            assert bobs.status == 200
            full = await http.get(url, headers={"Authorization": f"Bearer {carol}"})
            assert full.status_code == 429 and "relay" in full.json()["error"]

            # A client that goes away is noticed and its slot freed promptly.
            await opened[0].close()
            deadline = time.monotonic() + 5
            while metric(relay, "relay_subscribers") > 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert metric(relay, "relay_subscribers") == 2
            again = Subscriber(http, url, carol).start()
            await asyncio.wait_for(again.ready.wait(), 10)
            assert again.status == 200
            for sub in (opened[1], bobs, again):
                await sub.close()


async def test_head_on_a_stream_answers_headers_and_holds_no_slot(database_url: str) -> None:
    restaurant = uuid.uuid4()
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_MAX_CONNECTIONS_PER_SUBJECT": "1"}
    with RelayProcess(database_url, env=env) as relay:
        url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
        token = mint_token(SECRET, subject="alice", restaurant_ids=[restaurant])
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(2):  # a HEAD that kept its slot would make the next one a 429
            head = httpx.head(url, headers=auth, timeout=5)
            assert head.status_code == 200
            assert head.headers["content-type"].startswith("text/event-stream")
            assert head.headers["cache-control"] == "no-cache"
        assert metric(relay, "relay_subscribers") == 0
        async with client() as http:
            stream = Subscriber(http, url, token).start()
            await asyncio.wait_for(stream.ready.wait(), 10)
            assert stream.status == 200
            await stream.close()


def test_cors_allows_configured_origins_with_credentials(database_url: str) -> None:
    env = {"RELAY_CORS_ORIGINS": "https://ops.example.com"}
    with RelayProcess(database_url, env=env) as relay:
        url = f"{relay.url}/v1/restaurants/{uuid.uuid4()}/events"
        preflight = {"Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization,last-event-id"}  # fmt: skip
        allowed = httpx.options(url, headers={"Origin": "https://ops.example.com", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ops.example.com"
        assert allowed.headers["access-control-allow-credentials"] == "true"
        refused = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in refused.headers
        simple = httpx.get(url, headers={"Origin": "https://ops.example.com"})
        assert simple.status_code == 401  # CORS never bypasses auth
        assert simple.headers["access-control-allow-origin"] == "https://ops.example.com"
