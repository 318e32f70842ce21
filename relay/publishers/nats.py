"""NATS JetStream with nats-py: every publish acknowledged by the stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import nats
import nats.js.errors
from nats.js.api import StreamConfig

from relay.publishers.base import (
    JSON,
    Message,
    Outcome,
    PermanentRejection,
    cloudevent_attributes,
    in_order_per_restaurant,
)
from relay.publishers.config import CloudEvents, PublisherConfig

__all__ = ["JetStreamBroker", "nats_headers", "unless_lost"]

T = TypeVar("T")

# CloudEvents NATS protocol binding, binary content mode: every attribute,
# datacontenttype included, is a header named "ce-" + its name (§3.1.3.1),
# valued by its canonical string percent-encoded (§3.1.3.2): printable ASCII
# stays as it is, except space, double quote and percent; anything else is its
# UTF-8 bytes as %XY. (Content-Type stays application/json: only
# application/cloudevents there would mean structured mode, §3.)
CLOUDEVENTS_PREFIX = "ce-"
_VERBATIM = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def nats_headers(message: Message, cloudevents: CloudEvents | None) -> dict[str, str]:
    """One message's headers: message id for JetStream's dedupe, the relay's own
    headers always, the CloudEvents ones when asked for."""
    headers = {
        "Nats-Msg-Id": message.event_id,
        "Relay-Schema-Version": str(message.schema_version),
        "Relay-Occurred-On-Utc": message.occurred_on_text,
        "Content-Type": JSON,
    }
    if cloudevents is not None:
        attributes = cloudevent_attributes(message, cloudevents)
        headers.update(
            {CLOUDEVENTS_PREFIX + name: quote(value, safe=_VERBATIM)
             for name, value in attributes.items()}
        )  # fmt: skip
    return headers


async def unless_lost(sending: Awaitable[T], lost: asyncio.Event) -> T:
    """Await a publish, but give up (ConnectionError) as soon as ``lost`` is
    set: nats-py leaves a request pending until its timeout when the
    connection drops."""
    publish = asyncio.ensure_future(sending)
    gone = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({publish, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not publish.done():
        publish.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await publish
        raise ConnectionError("connection to NATS lost")
    return publish.result()


# JetStream errors that concern the message itself (retrying cannot help):
# 10054 message larger than the stream allows, 10077 too many messages per subject
_PERMANENT_ERR_CODES = frozenset({10054, 10077})


async def _quiet(_error: Exception) -> None:
    return None


class JetStreamBroker:
    """Subject ``{prefix}.{eventType}.{restaurantId}``; ``Nats-Msg-Id`` = event id,
    so JetStream's duplicate window drops a republished batch."""

    def __init__(self, config: PublisherConfig, *, timeout: float = 10.0) -> None:
        self.config = config
        self.stream = config.options["stream"]
        self.prefix = config.options["prefix"]
        self.create = config.options["create"] == "true"
        self.timeout = timeout
        self._nc: Any = None
        self._js: Any = None
        self._lost = asyncio.Event()

    async def connect(self) -> None:
        self._lost = asyncio.Event()

        async def on_disconnect() -> None:
            self._lost.set()

        self._nc = await nats.connect(
            self.config.url,
            connect_timeout=self.timeout,
            allow_reconnect=False,  # the follower owns reconnection and logs outages
            # nats-py retries a first connection forever with 0: with 1, an
            # unreachable server fails the connect after a second try.
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=_quiet,  # the follower logs one line per outage
            disconnected_cb=on_disconnect,
        )
        self._js = self._nc.jetstream(timeout=self.timeout)
        if self.create:
            try:
                await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(
                    StreamConfig(name=self.stream, subjects=[f"{self.prefix}.>"])
                )

    async def _send(self, message: Message) -> None:
        if len(message.body) > self._nc.max_payload:
            raise PermanentRejection(
                f"message of {len(message.body)} bytes exceeds the server's "
                f"max_payload {self._nc.max_payload}"
            )
        try:
            await self._js.publish(
                f"{self.prefix}.{message.event_type}.{message.restaurant_id}",
                message.body,
                headers=nats_headers(message, self.config.cloudevents),
                stream=self.stream,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _PERMANENT_ERR_CODES:
                raise PermanentRejection(
                    f"JetStream refused the message: {exc.description}"
                ) from exc
            raise

    async def publish(self, batch: Sequence[Message]) -> list[Outcome]:
        # Acked one by one per restaurant (order), restaurants concurrently.
        # Not publish_async: nats-py 2.16 never resolves its future when
        # JetStream answers with an error, so a refused message would hang.
        # nats-py leaves a request pending until its timeout when the
        # connection drops: give up on the batch as soon as it does.
        assert self._js is not None
        return await unless_lost(in_order_per_restaurant(batch, self._send), self._lost)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
