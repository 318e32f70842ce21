"""RabbitMQ with aio-pika: a durable topic exchange, persistent messages, publisher confirms."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from relay.publishers.base import (
    JSON,
    Message,
    Outcome,
    PermanentRejection,
    cloudevent_attributes,
    in_order_per_restaurant,
)
from relay.publishers.config import CloudEvents, PublisherConfig

__all__ = ["RabbitMqBroker", "amqp_properties"]

# CloudEvents AMQP protocol binding, binary content mode: every attribute but
# datacontenttype is an application property (RabbitMQ: a message header) named
# with the prefix "cloudEvents_" (§3.1.3.1; "_" rather than ":" so JMS clients
# and selectors can read it), valued by its canonical string (§3.1.3.2; a native
# AMQP 0-9-1 timestamp would lose the sub-second part); datacontenttype is the
# message's content-type property (§3.1.1).
CLOUDEVENTS_PREFIX = "cloudEvents_"


def amqp_properties(
    message: Message, cloudevents: CloudEvents | None
) -> tuple[str, dict[str, Any]]:
    """The content type and headers of one message: the relay's own headers always
    (a consumer of plain JSON keeps working), the CloudEvents ones when asked for."""
    headers: dict[str, Any] = {
        "schemaVersion": message.schema_version,
        "occurredOnUtc": message.occurred_on_text,
    }
    if cloudevents is None:
        return JSON, headers
    attributes = cloudevent_attributes(message, cloudevents)
    content_type = attributes.pop("datacontenttype")
    headers.update({CLOUDEVENTS_PREFIX + name: value for name, value in attributes.items()})
    return content_type, headers


class RabbitMqBroker:
    """Routing key ``{eventType}.{restaurantId}``; message id = event id for dedupe."""

    def __init__(self, config: PublisherConfig, *, timeout: float = 10.0) -> None:
        self.config = config
        self.exchange_name = config.options["exchange"]
        self.max_bytes = int(config.options["max_bytes"])
        self.timeout = timeout
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def connect(self) -> None:
        # connect(), not connect_robust(): the follower owns reconnection, so an
        # outage surfaces as an error here instead of being silently retried.
        connection: Any = await aio_pika.connect(self.config.url, timeout=self.timeout)
        self._connection = connection
        await self._open_channel()

    async def _open_channel(self) -> None:
        assert self._connection is not None
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _send(self, message: Message) -> None:
        assert self._exchange is not None
        if len(message.body) > self.max_bytes:
            raise PermanentRejection(
                f"message of {len(message.body)} bytes exceeds max_bytes={self.max_bytes}"
            )
        content_type, headers = amqp_properties(message, self.config.cloudevents)
        await self._exchange.publish(
            aio_pika.Message(
                message.body,
                message_id=message.event_id,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=message.event_type,
                headers=headers,
            ),
            routing_key=f"{message.event_type}.{message.restaurant_id}",
            timeout=self.timeout,
        )

    async def publish(self, batch: Sequence[Message]) -> list[Outcome]:
        try:
            return await in_order_per_restaurant(batch, self._send)
        except aiormq.exceptions.ChannelPreconditionFailed:
            # The broker closed the channel over one message (e.g. its size
            # limit): find which, one at a time, on fresh channels.
            return [await self._alone(message) for message in batch]

    async def _alone(self, message: Message) -> Outcome:
        await self._open_channel()
        try:
            await self._send(message)
        except PermanentRejection as exc:
            return str(exc)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            return f"RabbitMQ refused the message: {exc}"
        return None

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
