"""The integration contract as other teams use it: the AsyncAPI document from the
real command, and the README's consumers run against a real relay and brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import nats
import pytest
from nats.js.api import StreamConfig

from relay.gateway.asyncapi import asyncapi_text
from tests.acceptance.test_cloudevents import produce
from tests.helpers.brokers import NATS, RABBIT, require, unique
from tests.helpers.orders import CHAIN, event
from tests.helpers.relay_process import RelayProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def test_relay_schema_asyncapi_writes_the_document(tmp_path: Path) -> None:
    def schema_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "schema", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    target = tmp_path / "asyncapi.json"
    written = schema_command("--asyncapi", str(target))
    printed = schema_command("--asyncapi", "-")

    assert written.returncode == 0, written.stderr
    assert target.read_text() == printed.stdout == asyncapi_text()
    document = json.loads(printed.stdout)
    assert written.stdout.strip() == (
        f"{target}: AsyncAPI 3.0.0, {len(document['channels'])} channels, "
        f"{len(document['components']['messages'])} messages"
    )


def readme_consumers(**replacements: str) -> dict[str, Any]:
    """The README's consumer code, with its broker addresses and names replaced."""
    section = README.read_text().split("## Consuming events", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    for old, new in replacements.items():
        assert old in code, f"the README's consumers no longer mention {old}"
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.mark.broker
async def test_the_readme_consumers_read_order_delivered_as_cloudevents(
    database_url: str,
) -> None:
    require("RabbitMQ", RABBIT)
    require("NATS", NATS)
    exchange, queue, stream, prefix, durable = (
        unique("relay.readme."), unique("billing.delivered."), unique("RREADME"),
        unique("rreadme"), unique("billing"),
    )  # fmt: skip
    rabbit_url = f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/"
    nats_url = f"nats://{NATS[0]}:{NATS[1]}"
    consumers = readme_consumers(**{
        "amqp://guest:guest@rabbitmq/": rabbit_url, '"relay.events"': repr(exchange),
        '"billing.delivered"': repr(queue), "nats://nats:4222": nats_url,
        '"relay.OrderDelivered.>"': repr(f"{prefix}.OrderDelivered.>"),
        'durable="billing"': f"durable={durable!r}",
    })  # fmt: skip
    publishers = (
        f"{rabbit_url}?exchange={exchange}&format=cloudevents,"
        f"{nats_url}?stream={stream}&prefix={prefix}&format=cloudevents"
    )
    restaurants = [uuid.uuid4(), uuid.uuid4()]
    produced = [
        event(name, restaurant_id=restaurant, order_id=order)
        for restaurant in restaurants
        for order in [uuid.uuid4()]
        for name in ["OrderPaymentSucceeded", *CHAIN]
    ]
    delivered = {str(e.event_id) for e in produced if e.event_type == "OrderDelivered"}
    received: dict[str, list[tuple[str, dict[str, Any]]]] = {"rabbitmq": [], "nats": []}

    def handler(bus: str) -> Callable[[str, dict[str, Any]], None]:
        return lambda ce_type, data: received[bus].append((ce_type, data))

    async with await nats.connect(nats_url) as nc:
        js = nc.jetstream()
        # The stream exists before the consumer binds (the relay would create it too).
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
        tasks = [
            asyncio.create_task(consumers["from_rabbitmq"](handler("rabbitmq"))),
            asyncio.create_task(consumers["from_nats"](handler("nats"))),
        ]
        try:
            await _queue_bound(rabbit_url, queue)
            with RelayProcess(database_url, env={"RELAY_PUBLISHERS": publishers}):
                await asyncio.to_thread(produce, database_url, produced)
                async with asyncio.timeout(30):
                    while any(len(got) < len(delivered) for got in received.values()):
                        assert not (ended := [t.exception() for t in tasks if t.done()]), ended
                        await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
            await _delete_queue(rabbit_url, queue, exchange)

    for bus, got in received.items():
        assert {ce_type for ce_type, _ in got} == {"OrderDelivered.v1"}, bus
        assert {data["eventId"] for _, data in got} == delivered, bus
        assert {data["restaurantId"] for _, data in got} == {str(r) for r in restaurants}


async def _queue_bound(url: str, queue: str) -> None:
    """Wait until the README's consumer declared its queue (and so bound it)."""
    async with await aio_pika.connect(url) as connection, asyncio.timeout(10):
        while True:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue, passive=True)
                return
            except aio_pika.exceptions.ChannelClosed:
                await asyncio.sleep(0.05)


async def _delete_queue(url: str, queue: str, exchange: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
