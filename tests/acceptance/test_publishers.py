"""External publishers into real RabbitMQ and NATS JetStream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.log import END
from relay.outbox import OutboxEvent, enqueue
from relay.sql import query
from relay.tools.status import collect
from tests.helpers.brokers import (
    NATS,
    RABBIT,
    jetstream_consumer,
    rabbit_consumer,
    require,
    unique,
)
from tests.helpers.orders import CHAIN, event
from tests.helpers.proxy import LoopbackProxy
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.helpers.sse import Subscriber, client

pytestmark = pytest.mark.broker


def chains(restaurants: list[uuid.UUID], orders: int) -> list[list[OutboxEvent]]:
    return [
        [event(name, restaurant_id=restaurants[i % len(restaurants)], order_id=order)
         for name in ("OrderPaymentSucceeded", *CHAIN)]
        for i, order in enumerate(uuid.uuid4() for _ in range(orders))
    ]  # fmt: skip


def produce_interleaved(url: str, lifecycles: list[list[OutboxEvent]]) -> dict[str, list[str]]:
    """Commit step by step across orders; returns per restaurant the event ids in commit order."""
    expected: dict[str, list[str]] = defaultdict(list)
    with psycopg.connect(url) as conn:
        for step in range(len(lifecycles[0])):
            for i, lifecycle in enumerate(lifecycles):
                item = lifecycle[step]
                enqueue(conn, item)
                expected[str(item.restaurant_id)].append(str(item.event_id))
                if i % 5 == 4:
                    conn.commit()
            conn.commit()
    return dict(expected)


def amqp(port: int, exchange: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"exchange": exchange, **options}.items())
    return f"amqp://guest:guest@127.0.0.1:{port}/?{query}"


def nats_url(port: int, stream: str, prefix: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"stream": stream, "prefix": prefix, **options}.items())
    return f"nats://127.0.0.1:{port}?{query}"


def _reachable(broker: str) -> tuple[str, int]:
    """The broker's address, or skip the test saying it cannot be reached."""
    target = RABBIT if broker == "rabbitmq" else NATS
    require(broker, target)
    return target


def publishers_ready(relay: RelayProcess) -> dict[str, Any]:
    checks: dict[str, Any] = httpx.get(f"{relay.url}/readyz", timeout=5).json()["checks"]
    return dict(checks.get("publishers", {}))


async def test_events_reach_rabbitmq_and_jetstream_once_each_in_order(database_url: str) -> None:
    require("RabbitMQ", RABBIT)
    require("NATS", NATS)
    exchange, finance_exchange = unique("relay.test."), unique("relay.finance.")
    stream, prefix = unique("RT"), unique("rt")
    restaurants = [uuid.uuid4() for _ in range(10)]
    lifecycles = chains(restaurants, 200)  # 1,000 events
    publishers = ",".join([
        amqp(RABBIT[1], exchange),
        amqp(RABBIT[1], finance_exchange, events="OrderPaymentSucceeded", name="payments"),
        nats_url(NATS[1], stream, prefix),
    ])  # fmt: skip
    async with (
        rabbit_consumer(exchange) as rabbit,
        rabbit_consumer(finance_exchange) as payments,
        jetstream_consumer(stream, prefix) as jetstream,
    ):
        with RelayProcess(database_url, env={"RELAY_PUBLISHERS": publishers}) as relay:
            expected = await asyncio.to_thread(produce_interleaved, database_url, lifecycles)
            every = {i for ids in expected.values() for i in ids}
            assert len(every) == 1000
            await rabbit.wait_for(every)
            await jetstream.wait_for(every)
            paid = {str(c[0].event_id) for c in lifecycles}
            await payments.wait_for(paid)
            ready = publishers_ready(relay)
            status = await asyncio.to_thread(collect, database_url)

    for consumer in (rabbit, jetstream):
        assert consumer.unique_ids() == every  # nothing foreign, nothing missing
        assert consumer.first_order() == expected  # per-restaurant commit order
        for m in consumer.messages:
            assert "customerName" not in m.body and "deliveryAddress" not in m.body
            assert m.body["restaurantId"] == m.restaurant
    assert len(jetstream.messages) == 1000  # JetStream's window dropped any republish
    assert payments.unique_ids() == paid  # the filtered publisher: its event type only
    assert {m.event_type for m in payments.messages} == {"OrderPaymentSucceeded"}

    first = rabbit.messages[0]
    assert first.headers["content_type"] == "application/json"
    assert first.headers["delivery_mode"] == 2  # persistent
    assert first.headers["schemaVersion"] == 1
    assert first.headers["occurredOnUtc"].endswith("Z")
    assert jetstream.messages[0].headers["Relay-Schema-Version"] == "1"

    assert len(ready) == 3 and {r["state"] for r in ready.values()} == {"publishing"}
    assert {p["publisher"]: p["lag_windows"] for p in status["publishers"]} == {
        name: 0 for name in ready
    }
    assert not any("guest:guest" in name for name in ready)  # credentials stay out


@pytest.mark.parametrize("broker", ["rabbitmq", "jetstream"])
async def test_broker_outage_loses_nothing_and_never_stalls_sse(
    broker: str, database_url: str
) -> None:
    target = _reachable(broker)
    proxy = LoopbackProxy(*target)
    exchange, stream, prefix = unique("relay.outage."), unique("RO"), unique("ro")
    url = (
        amqp(proxy.port, exchange) if broker == "rabbitmq" else nats_url(proxy.port, stream, prefix)
    )
    restaurant = uuid.uuid4()
    consume = (
        rabbit_consumer(exchange) if broker == "rabbitmq" else jetstream_consumer(stream, prefix)
    )
    committed: list[tuple[OutboxEvent, float]] = []
    try:
        async with consume as consumer, client() as http:
            env = {"RELAY_PUBLISHERS": url, "RELAY_HEARTBEAT_SECONDS": "1"}
            with RelayProcess(database_url, env=env) as relay:
                token = mint_token(SECRET, subject="s", restaurant_ids=[restaurant])
                sse = Subscriber(
                    http, f"{relay.url}/v1/restaurants/{restaurant}/stream", token
                ).start()
                await asyncio.wait_for(sse.ready.wait(), 10)
                producing = threading.Event()
                producing.set()

                def produce() -> None:
                    with psycopg.connect(database_url) as conn:
                        while producing.is_set():
                            for item in chains([restaurant], 1)[0]:
                                enqueue(conn, item)
                                conn.commit()
                                committed.append((item, time.monotonic()))
                            time.sleep(0.02)

                writer = asyncio.create_task(asyncio.to_thread(produce))
                await asyncio.sleep(1.5)
                proxy.cut()
                cut_at = time.monotonic()
                await asyncio.sleep(5)
                # During the outage the dashboard kept up: everything committed
                # up to half a second ago has already arrived over SSE, in order.
                behind = [e for e, at in committed if at < time.monotonic() - 0.5]
                on_sse = [_key(json.loads(f.data)) for f in sse.events]
                assert on_sse[: len(behind)] == [_key(e.payload) for e in behind]
                during = sum(1 for _e, at in committed if at > cut_at)
                state = publishers_ready(relay)
                proxy.restore()
                await asyncio.sleep(1.5)
                producing.clear()
                await writer
                await consumer.wait_for({str(e.event_id) for e, _ in committed}, timeout=60)
                output = relay.output()
                await sse.close()
    finally:
        proxy.close()

    assert during > 50  # the outage really overlapped production
    assert next(iter(state.values()))["state"] == "broker unavailable"
    assert consumer.first_order() == {str(restaurant): [str(e.event_id) for e, _ in committed]}
    assert output.count("broker unavailable (") == 1  # one line per outage
    assert "broker reachable again" in output
    assert "Traceback" not in output


def _key(body: Any) -> tuple[str, str]:
    return str(body["orderId"]), str(body.get("newStatus") or body["status"])


# Every publisher's durable offset: (window, xid, id) of what the broker confirmed.
OFFSETS = "SELECT window_id, xid, id FROM relay_offsets WHERE starts_with(follower, 'publisher:')"


async def test_killed_between_broker_confirm_and_offset_commit_republishes(
    database_url: str,
) -> None:
    require("RabbitMQ", RABBIT)
    exchange = unique("relay.kill.")
    restaurants = [uuid.uuid4() for _ in range(3)]
    lifecycles = chains(restaurants, 120)  # 600 events: more than one page (500)
    env = {"RELAY_PUBLISHERS": amqp(RABBIT[1], exchange)}
    async with rabbit_consumer(exchange) as rabbit:
        with psycopg.connect(database_url, autocommit=True) as blocker:
            first = RelayProcess(database_url, env=env).start()
            try:
                # Wait until the publisher has its offset, then hold it: the
                # relay can publish to the broker but not record that it did.
                deadline = time.monotonic() + 15
                while not blocker.execute(OFFSETS).fetchall():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                blocker.execute("BEGIN")
                held = blocker.execute(OFFSETS + " FOR UPDATE").fetchall()
                expected = await asyncio.to_thread(produce_interleaved, database_url, lifecycles)
                # The first batch is confirmed by the broker...
                deadline = time.monotonic() + 15
                while not rabbit.messages and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1)
                with psycopg.connect(database_url, autocommit=True) as reader:
                    moved = reader.execute(OFFSETS).fetchall()
                assert moved == held  # ...but not recorded
                first.kill()  # between broker confirm and offset commit
            finally:
                first.__exit__()
            blocker.execute("ROLLBACK")
        every = {i for ids in expected.values() for i in ids}
        before = [m.message_id for m in rabbit.messages]
        with RelayProcess(database_url, env=env):
            await rabbit.wait_for(every)
            await asyncio.sleep(0.5)

    assert before and set(before) < every
    after = [m.message_id for m in rabbit.messages[len(before) :]]
    # The restarted relay sent every event once, the unrecorded batch among
    # them again with the same message ids (restaurants are confirmed
    # concurrently, so only each restaurant's order is fixed).
    assert sorted(after) == sorted(every)
    assert len(rabbit.messages) == len(before) + 600
    assert rabbit.unique_ids() == every  # nothing lost
    assert rabbit.first_order() == expected


@pytest.mark.parametrize("broker", ["rabbitmq", "jetstream"])
async def test_permanently_rejected_message_is_dead_lettered_and_later_events_flow(
    broker: str, database_url: str
) -> None:
    _reachable(broker)
    exchange, stream, prefix = unique("relay.reject."), unique("RR"), unique("rr")
    restaurant = uuid.uuid4()
    big = event("OrderPaymentSucceeded", restaurant_id=restaurant)
    small = [event("OrderPaymentFailed", restaurant_id=restaurant) for _ in range(3)]
    if broker == "rabbitmq":
        url = amqp(RABBIT[1], exchange, max_bytes="400")
        consume = rabbit_consumer(exchange)
    else:
        # The stream's own size limit: JetStream itself refuses the big event.
        url = nats_url(NATS[1], stream, prefix, create="false")
        consume = jetstream_consumer(stream, prefix, max_msg_size=600)
    async with consume as consumer:
        with RelayProcess(database_url, env={"RELAY_PUBLISHERS": url}) as relay:
            await asyncio.to_thread(_produce, database_url, [small[0], big, *small[1:]])
            try:
                await consumer.wait_for({str(e.event_id) for e in small}, timeout=10)
            except AssertionError as exc:
                raise AssertionError(relay.output()[-3000:]) from exc
            deadline = time.monotonic() + 10
            with psycopg.connect(database_url) as conn:
                while True:
                    rows = conn.execute(
                        "SELECT event_id, event_type, reason FROM relay_publisher_dead_letters"
                    ).fetchall()
                    if rows or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            metrics = httpx.get(f"{relay.url}/metrics").text

    assert [(str(r[0]), r[1]) for r in rows] == [(str(big.event_id), "OrderPaymentSucceeded")]
    assert "max_bytes" in rows[0][2] if broker == "rabbitmq" else "JetStream" in rows[0][2]
    assert consumer.first_order() == {str(restaurant): [str(e.event_id) for e in small]}
    assert "relay_broker_rejected_total" in metrics


def _produce(url: str, events: list[OutboxEvent]) -> None:
    with psycopg.connect(url) as conn:
        for item in events:
            enqueue(conn, item)
            conn.commit()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("kafka://broker:9092", "unsupported scheme 'kafka'"),
        ("amqp://guest:secret-pw@h:5672/?exchnage=x", "unknown option(s) exchnage"),
        ("nats://h:4222?events=OrderTeleported", "unknown event type(s) OrderTeleported"),
        ("amqp://h/?max_bytes=lots", "max_bytes must be a byte count"),
        ("nats://h:4222,nats://h:4222", "share the name"),
    ],
)
def test_bad_publisher_urls_stop_startup_with_a_clear_message(
    value: str, message: str, database_url: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "run"],
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": database_url,
            "RELAY_JWT_SECRET": SECRET,
            "RELAY_PUBLISHERS": value,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "secret-pw" not in result.stderr and "Traceback" not in result.stderr


async def test_one_process_publishes_a_standby_takes_over(database_url: str) -> None:
    require("NATS", NATS)
    stream, prefix = unique("RS"), unique("rs")
    restaurant = uuid.uuid4()
    env = {"RELAY_PUBLISHERS": nats_url(NATS[1], stream, prefix, name="analytics")}
    async with jetstream_consumer(stream, prefix) as consumer:
        with RelayProcess(database_url, env=env) as a, RelayProcess(database_url, env=env) as b:
            await asyncio.sleep(1)
            # Off the event loop: the consumer must keep receiving meanwhile.
            states = {
                a.port: await asyncio.to_thread(_state, a),
                b.port: await asyncio.to_thread(_state, b),
            }
            assert sorted(states.values()) == ["publishing", "standby"], states
            leader, standby = (a, b) if states[a.port] == "publishing" else (b, a)
            batch = chains([restaurant], 10)
            await asyncio.to_thread(_produce, database_url, [e for c in batch for e in c])
            leader.kill()
            later = chains([restaurant], 10)
            await asyncio.to_thread(_produce, database_url, [e for c in later for e in c])
            every = {str(e.event_id) for c in batch + later for e in c}
            await consumer.wait_for(every, timeout=30)
            assert await asyncio.to_thread(_state, standby) == "publishing"
    assert consumer.first_order() == {
        str(restaurant): [str(e.event_id) for c in batch + later for e in c]
    }


def _state(relay: RelayProcess) -> str:
    deadline = time.monotonic() + 10
    while True:
        state = str(publishers_ready(relay)["analytics"]["state"])
        if state != "starting" or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


async def test_publisher_survives_losing_its_database_connection(database_url: str) -> None:
    _reachable("jetstream")
    stream, prefix = unique("RD"), unique("rd")
    restaurant = uuid.uuid4()
    env = {"RELAY_PUBLISHERS": nats_url(NATS[1], stream, prefix, name="analytics")}
    async with jetstream_consumer(stream, prefix) as consumer:
        with RelayProcess(database_url, env=env) as relay:
            before = [e for c in chains([restaurant], 4) for e in c]
            await asyncio.to_thread(_produce, database_url, before)
            await consumer.wait_for({str(e.event_id) for e in before})
            with psycopg.connect(database_url, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            after = [e for c in chains([restaurant], 4) for e in c]
            await asyncio.to_thread(_produce, database_url, after)
            await consumer.wait_for({str(e.event_id) for e in after}, timeout=30)
            output = relay.output()
    assert killed is not None and killed[0] >= 3  # the publisher's connection among them
    assert "publisher analytics: database connection lost" in output
    assert consumer.first_order() == {str(restaurant): [str(e.event_id) for e in before + after]}


async def test_publisher_behind_retention_resumes_at_the_oldest_retained_event(
    database_url: str,
) -> None:
    _reachable("jetstream")
    restaurant = uuid.uuid4()
    old = [e for c in chains([restaurant], 2) for e in c]
    await asyncio.to_thread(_produce, database_url, old)
    with psycopg.connect(database_url, autocommit=True) as conn:
        recorded = conn.execute(query("record_window")).fetchone()
        assert recorded is not None
        # Retention has cut through the window of the old events (their rows are
        # left in place: a publisher ignoring the bound would deliver them).
        conn.execute("UPDATE relay_log_bounds SET pruned_through = %s", (recorded[0],))
        # "behind" last delivered before everything; "fresh" has no offset yet.
        conn.execute(
            "INSERT INTO relay_offsets (follower, window_id, xid, id)"
            " VALUES ('publisher:behind', -1, %(end)s, %(end)s)",
            {"end": END},
        )
    streams = [(unique("RB"), unique("rb")), (unique("RF"), unique("rf"))]
    env = {"RELAY_PUBLISHERS": ",".join(
        nats_url(NATS[1], stream, prefix, name=name)
        for (stream, prefix), name in zip(streams, ("behind", "fresh"), strict=True)
    )}  # fmt: skip
    async with (
        jetstream_consumer(*streams[0]) as behind,
        jetstream_consumer(*streams[1]) as fresh,
    ):
        with RelayProcess(database_url, env=env):
            new = [e for c in chains([restaurant], 2) for e in c]
            await asyncio.to_thread(_produce, database_url, new)
            ids = {str(e.event_id) for e in new}
            await behind.wait_for(ids, timeout=30)
            await fresh.wait_for(ids, timeout=30)
            await asyncio.sleep(1)  # time enough for anything older to show up

    for consumer in (behind, fresh):
        assert consumer.first_order() == {str(restaurant): [str(e.event_id) for e in new]}
