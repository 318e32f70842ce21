"""Real RabbitMQ and NATS JetStream for publisher tests: reachability, and consumers
that record what arrived (message id, restaurant, body, headers) in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import nats
import pytest
from nats.js.api import StreamConfig

RABBIT = ("127.0.0.1", 5672)
NATS = ("127.0.0.1", 4222)


def require(name: str, address: tuple[str, int]) -> None:
    """Skip (with the reason) when the broker is not reachable; CI has both."""
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError as exc:
        pytest.skip(f"{name} not reachable on {address[0]}:{address[1]} ({exc}); "
                    "start it to run the broker tests")  # fmt: skip


@dataclass
class Received:
    message_id: str
    restaurant: str
    event_type: str
    body: dict[str, Any]
    headers: dict[str, Any]


@dataclass
class Consumer:
    messages: list[Received] = field(default_factory=list)

    def unique_ids(self) -> set[str]:
        return {m.message_id for m in self.messages}

    async def wait_for(self, ids: set[str], timeout: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not ids <= self.unique_ids():
            if asyncio.get_running_loop().time() > deadline:
                missing = len(ids - self.unique_ids())
                raise AssertionError(f"{missing} of {len(ids)} events never arrived")
            await asyncio.sleep(0.05)

    def first_order(self) -> dict[str, list[str]]:
        """Per restaurant, message ids in order of first arrival (a deduping consumer)."""
        seen: set[str] = set()
        order: dict[str, list[str]] = {}
        for m in self.messages:
            if m.message_id not in seen:
                seen.add(m.message_id)
                order.setdefault(m.restaurant, []).append(m.message_id)
        return order


@contextlib.asynccontextmanager
async def rabbit_consumer(exchange: str) -> AsyncIterator[Consumer]:
    """A queue bound to every routing key of ``exchange`` (declared as relay declares it)."""
    consumer = Consumer()
    connection = await aio_pika.connect(f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/")
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(ex, routing_key="#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event_type, restaurant = (message.routing_key or "").split(".", 1)
            consumer.messages.append(Received(
                message_id=str(message.message_id), restaurant=restaurant,
                event_type=event_type, body=json.loads(message.body),
                headers={**dict(message.headers), "content_type": message.content_type,
                         "delivery_mode": int(message.delivery_mode or 0)},
            ))  # fmt: skip

        await queue.consume(on_message, no_ack=True)
        yield consumer
    finally:
        with contextlib.suppress(Exception):
            await channel.exchange_delete(exchange)
        await connection.close()


@contextlib.asynccontextmanager
async def jetstream_consumer(
    stream: str, prefix: str, *, max_msg_size: int | None = None
) -> AsyncIterator[Consumer]:
    """Creates ``stream`` on ``prefix.>`` (so a test can give it limits), follows it."""
    consumer = Consumer()
    nc = await nats.connect(f"nats://{NATS[0]}:{NATS[1]}")
    js = nc.jetstream()
    config = StreamConfig(name=stream, subjects=[f"{prefix}.>"])
    if max_msg_size is not None:
        config.max_msg_size = max_msg_size
    await js.add_stream(config)
    try:

        async def on_message(msg: Any) -> None:
            _prefix, event_type, restaurant = msg.subject.split(".", 2)
            headers = dict(msg.headers or {})
            consumer.messages.append(Received(
                message_id=headers.get("Nats-Msg-Id", ""), restaurant=restaurant,
                event_type=event_type, body=json.loads(msg.data), headers=headers,
            ))  # fmt: skip

        await js.subscribe(f"{prefix}.>", stream=stream, cb=on_message, manual_ack=False)
        yield consumer
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"
