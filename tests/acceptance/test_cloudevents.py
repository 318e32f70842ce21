"""Event contracts other teams consume, end to end against a real relay.

CloudEvents read from the real RabbitMQ and NATS JetStream with the official
SDK give back the event the relay rendered; every frame of a drain covering
every registered type validates against the schema the relay serves.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
from cloudevents.core.bindings import amqp, http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from relay.events import render
from relay.gateway.auth import mint_token
from relay.outbox import OutboxEvent, enqueue
from tests.helpers.brokers import (
    NATS,
    RABBIT,
    Received,
    jetstream_consumer,
    rabbit_consumer,
    require,
    unique,
)
from tests.helpers.orders import CHAIN, event
from tests.helpers.relay_process import SECRET, RelayProcess, free_port
from tests.helpers.sse import Subscriber, client

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def coupon(restaurant: uuid.UUID) -> OutboxEvent:
    payload = {"couponId": str(uuid.uuid4()), "previousUsageCount": 3, "newUsageCount": 4,
               "usedAt": "2026-11-25T12:00:00Z", "customerEmail": "pii@example.com"}  # fmt: skip
    return OutboxEvent("CouponUsed", payload, restaurant)


def finance(event_type: str, restaurant: uuid.UUID) -> OutboxEvent:
    order = uuid.uuid4()
    payload = {"restaurantAccountId": str(uuid.uuid4()), "restaurantId": str(restaurant),
               "orderId": str(order), "amount": "12.30", "newBalance": "1000.5"}  # fmt: skip
    return OutboxEvent(event_type, payload, restaurant, order_id=order)


def every_kind(restaurant: uuid.UUID) -> list[OutboxEvent]:
    """One of each producer-written type; a paid order nobody accepts raises the
    relay's own OrderDelayAlert when the SLA is short."""
    delivered = uuid.uuid4()
    return [
        event("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=delivered),
        *(event(name, restaurant_id=restaurant, order_id=delivered) for name in CHAIN),
        event("OrderPaymentFailed", restaurant_id=restaurant),
        event("OrderRejected", restaurant_id=restaurant),
        event("OrderCancelled", restaurant_id=restaurant),
        event("OrderPaymentSucceeded", restaurant_id=restaurant, customer_id=uuid.uuid4()),
        coupon(restaurant),
        finance("RevenueRecorded", restaurant),
        finance("PlatformFeeRecorded", restaurant),
    ]


def produce(url: str, events: Iterable[OutboxEvent]) -> None:
    with psycopg.connect(url) as conn:
        for item in events:
            enqueue(conn, item)
            conn.commit()


class Schemas:
    """The schemas a relay serves, fetched once each, as real validators."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._schemas: dict[str, dict[str, Any]] = {}
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def fetch(self, url: str) -> dict[str, Any]:
        response = httpx.get(url, timeout=5)
        assert response.status_code == 200, (url, response.text)
        assert response.headers["content-type"] == "application/schema+json"
        schema: dict[str, Any] = response.json()
        return schema

    def validate(self, data: dict[str, Any], url: str | None = None) -> dict[str, Any]:
        url = url or f"{self.base}/v1/schemas/{data['eventType']}/{data['schemaVersion']}.json"
        if url not in self._validators:
            schema = self.fetch(url)
            jsonschema.Draft202012Validator.check_schema(schema)
            formats = jsonschema.Draft202012Validator.FORMAT_CHECKER
            assert "date-time" in formats.checkers  # rfc3339-validator installed
            self._schemas[url] = schema
            self._validators[url] = jsonschema.Draft202012Validator(schema, format_checker=formats)
        self._validators[url].validate(data)
        return self._schemas[url]


def sdk_event(received: Received, binding: str) -> CloudEvent:
    """The message as the official CloudEvents SDK reads it (binary content mode)."""
    body = json.dumps(received.body).encode()
    if binding == "amqp":
        properties = {"content-type": received.headers["content_type"]}
        attributes = {k: v for k, v in received.headers.items() if k.startswith("cloudEvents_")}
        read = amqp.from_binary(amqp.AMQPMessage(properties, attributes, body), JSONFormat())
    else:  # NATS: HTTP's ce- mapping and percent-decoding; no SDK binding of its own
        attributes = {k: v for k, v in received.headers.items() if k.startswith("ce-")}
        read = http.from_binary(http.HTTPMessage(attributes, body), JSONFormat())
    assert isinstance(read, CloudEvent)
    return read


@pytest.mark.broker
async def test_cloudevents_from_rabbitmq_and_jetstream_read_back_with_the_sdk(
    database_url: str,
) -> None:
    require("RabbitMQ", RABBIT)
    require("NATS", NATS)
    port = free_port()
    served = f"http://127.0.0.1:{port}/v1/schemas"
    exchange, plain_exchange, stream, prefix = (
        unique("relay.ce."), unique("relay.plain."), unique("RCE"), unique("rce")
    )  # fmt: skip
    publishers = ",".join([
        f"amqp://guest:guest@127.0.0.1:{RABBIT[1]}/?exchange={exchange}&format=cloudevents"
        f"&source=/orders/eu&schemas={served}&type_prefix=com.example.orders",
        f"nats://127.0.0.1:{NATS[1]}?stream={stream}&prefix={prefix}&format=cloudevents",
        f"amqp://guest:guest@127.0.0.1:{RABBIT[1]}/?exchange={plain_exchange}",
    ])  # fmt: skip
    restaurant = uuid.uuid4()
    produced = every_kind(restaurant)
    ids = {str(e.event_id) for e in produced}
    async with (
        rabbit_consumer(exchange) as rabbit,
        rabbit_consumer(plain_exchange) as plain,
        jetstream_consumer(stream, prefix) as jetstream,
    ):
        env = {"RELAY_PUBLISHERS": publishers}
        with RelayProcess(database_url, env=env, port=port) as relay:
            await asyncio.to_thread(produce, database_url, produced)
            for consumer in (rabbit, jetstream, plain):
                await consumer.wait_for(ids, timeout=30)
            schemas = Schemas(relay.url)
            by_id = {str(e.event_id): e for e in produced}
            for received in rabbit.messages:
                item = by_id[received.message_id]
                ce = sdk_event(received, "amqp")
                assert ce.get_attributes() == {
                    "specversion": "1.0", "id": str(item.event_id), "source": "/orders/eu",
                    "type": f"com.example.orders.{item.event_type}.v1",
                    "subject": str(restaurant), "time": item.occurred_on_utc,
                    "dataschema": f"{served}/{item.event_type}/1.json",
                    "datacontenttype": "application/json",
                }  # fmt: skip
                assert ce.get_data() == render(item.envelope()).data  # the event relay rendered
                # dataschema resolves, at the relay, to the schema the data satisfies.
                schemas.validate(received.body, ce.get_dataschema())
            for received in jetstream.messages:
                item = by_id[received.message_id]
                ce = sdk_event(received, "nats")
                assert ce.get_attributes() == {
                    "specversion": "1.0", "id": str(item.event_id), "source": "/relay",
                    "type": f"{item.event_type}.v1", "subject": str(restaurant),
                    "time": item.occurred_on_utc,
                    "dataschema": f"urn:relay:schema:{item.event_type}:1",
                    "datacontenttype": "application/json",
                }  # fmt: skip
                assert ce.get_data() == render(item.envelope()).data
                schema = schemas.validate(received.body)
                assert schema["$id"] == ce.get_dataschema()  # the default names the schema

    assert {m.message_id for m in rabbit.messages} == ids == jetstream.unique_ids()
    # The default is unchanged: a plain publisher sends no CloudEvents attribute.
    for received in plain.messages:
        assert not [k for k in received.headers if k.lower().startswith("cloudevents")]
        assert received.headers["schemaVersion"] == 1


async def test_every_frame_of_a_drain_validates_against_its_served_schema(
    database_url: str,
) -> None:
    restaurant = uuid.uuid4()
    env = {"RELAY_SLA_NOT_ACCEPTED": "2s", "RELAY_SLA_NOT_READY": "30m"}
    with RelayProcess(database_url, env=env) as relay:
        staff = mint_token(SECRET, subject="s", restaurant_ids=[restaurant], roles=["finance"])
        admin = mint_token(SECRET, subject="a", restaurant_ids=[], roles=["admin"])
        async with client() as http_client:
            streams = [
                Subscriber(http_client, f"{relay.url}{path}", token).start()
                for path, token in (
                    (f"/v1/restaurants/{restaurant}/stream", staff),
                    (f"/v1/restaurants/{restaurant}/finance/stream", staff),
                    ("/v1/admin/stream", admin),
                )
            ]
            for stream in streams:
                await asyncio.wait_for(stream.ready.wait(), 10)
            await asyncio.to_thread(produce, database_url, every_kind(restaurant))
            # 9 order events + the delay alert, 2 finance entries, 1 coupon.
            counts = [10, 2, 1]
            frames = [await s.wait_for(n) for s, n in zip(streams, counts, strict=True)]
            for stream in streams:
                await stream.close()
        index = httpx.get(f"{relay.url}/v1/schemas", timeout=5).json()["schemas"]
        schemas = Schemas(relay.url)
        recorded = [frame for stream in frames for frame in stream]
        for frame in recorded:
            schemas.validate(frame.json())
        unknown = httpx.get(f"{relay.url}/v1/schemas/OrderTeleported/1.json", timeout=5)
        served = {
            entry["url"]: httpx.get(f"{relay.url}{entry['url']}", timeout=5).text for entry in index
        }

    assert [len(stream) for stream in frames] == counts
    seen = {frame.json()["eventType"] for frame in recorded}
    assert seen == {entry["eventType"] for entry in index}  # every registered type, drained
    assert unknown.status_code == 404
    for url, text in served.items():  # the served schemas are the committed ones
        assert text == (COMMITTED / url.removeprefix("/v1/schemas/")).read_text(), url


def test_relay_schema_writes_the_committed_schemas(tmp_path: Path) -> None:
    def schema_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "schema", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    first = schema_command("--json-schema", str(tmp_path))
    again = schema_command("--json-schema", str(tmp_path))
    nothing = schema_command()

    committed = {p.relative_to(COMMITTED): p.read_text() for p in COMMITTED.glob("*/*.json")}
    written = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.glob("*/*.json")}
    assert first.returncode == 0, first.stderr
    assert written == committed
    assert f"{len(committed)} JSON Schema file(s), {len(committed)} changed" in first.stdout
    assert again.stdout.strip() == f"{tmp_path}: {len(committed)} JSON Schema file(s), 0 changed"
    assert nothing.returncode == 2 and "give --json-schema DIR" in nothing.stderr
