"""The AsyncAPI 3.0 document (issue: event contracts, item 3).

It must be valid for the AsyncAPI project's own parser, describe every SSE
stream the gateway serves with the messages the routing table sends it and
the token it needs, and name the routing keys, subjects and headers the
publishers really write.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import jsonschema
import pytest
from pydantic.alias_generators import to_camel
from starlette.routing import Route

from relay.events import REGISTRY, Envelope, EventSpec, render
from relay.events.base import Contract
from relay.events.schemas import contracts
from relay.events.types import Money
from relay.gateway import asyncapi
from relay.gateway.app import GatewayConfig, create_app
from relay.gateway.asyncapi import asyncapi_document, channel_kinds, message_id
from relay.log import Position
from relay.publishers import nats as nats_publisher
from relay.publishers import rabbitmq
from relay.publishers.base import Message
from relay.publishers.config import CloudEvents, parse_publisher_url
from tests.helpers.asyncapi import errors, parse_with_asyncapi_parser
from tests.unit.test_schemas import ORDER, PII, SAMPLES, WHEN, OrderAcceptedV2, R

ORDER_EVENTS = {
    "OrderPaymentSucceeded", "OrderPaymentFailed", "OrderAccepted", "OrderPreparing",
    "OrderReadyForDelivery", "OrderDelivered", "OrderRejected", "OrderCancelled",
    "OrderDelayAlert",
}  # fmt: skip
# What each stream receives (README, "Who receives what"), and the access rule.
STREAMS = {
    "/v1/restaurants/{restaurantId}/stream": (ORDER_EVENTS, "restaurantStaff"),
    "/v1/restaurants/stream": (ORDER_EVENTS, "restaurantSetStaff"),
    "/v1/orders/{orderId}/stream": (ORDER_EVENTS, "orderFollower"),
    "/v1/me/orders/stream": (ORDER_EVENTS, "customer"),
    "/v1/restaurants/{restaurantId}/finance/stream": (
        {"RevenueRecorded", "PlatformFeeRecorded"}, "finance"
    ),
    "/v1/admin/stream": ({"CouponUsed"}, "admin"),
    "/v1/coupons/{couponId}/stream": ({"CouponUsed"}, "admin"),
}  # fmt: skip


class Line(Contract):
    sku: str
    quantity: int


class PartialRefund(Contract):
    """A throwaway type with a nested model: its schema has ``$defs``."""

    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    amount: Money
    lines: list[Line]


def _registered(monkeypatch: pytest.MonkeyPatch, spec: EventSpec) -> None:
    key = (spec.event_type, spec.schema_version)
    monkeypatch.setitem(cast(dict[tuple[str, int], EventSpec], REGISTRY), key, spec)


def _sse_addresses(document: dict[str, Any]) -> set[str]:
    return {
        channel["address"]
        for channel in document["channels"].values()
        if channel["servers"] == [{"$ref": "#/servers/gateway"}]
    }


def _message_types(channel: dict[str, Any]) -> set[str]:
    return {key.rsplit("_v", 1)[0] for key in channel["messages"]} - {"StreamReset"}


def test_the_asyncapi_parser_accepts_the_document_and_its_variants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = {"relay": asyncapi_document()}
    with monkeypatch.context() as patch:
        accepted = REGISTRY[("OrderAccepted", 1)]
        _registered(patch, EventSpec(
            "OrderAccepted", 2, OrderAcceptedV2, accepted.sse_event, accepted.route,
            expected_status="Accepted",
        ))  # fmt: skip
        refund = REGISTRY[("RevenueRecorded", 1)].route
        _registered(patch, EventSpec(
            "PartialRefund", 1, PartialRefund, "PartialRefund", refund
        ))  # fmt: skip
        documents["variants"] = asyncapi_document()

    reports = parse_with_asyncapi_parser(documents)

    for name, report in reports.items():
        assert report["parsed"] and not errors(report), (name, errors(report))
        warnings = [d for d in report["diagnostics"] if d["severity"] == "warning"]
        assert not warnings, (name, warnings)
        assert report["version"] == "3.0.0"
    parsed, variants = reports["relay"], reports["variants"]
    # What the parser understood is what we meant: every stream, every bus channel.
    addresses = {c["address"] for c in parsed["channels"].values()}
    assert set(STREAMS) <= addresses
    for event_type in {t for t, _ in REGISTRY}:
        assert {f"{event_type}.{{restaurantId}}", f"relay.{event_type}.{{restaurantId}}"} <= (
            addresses
        )
    bearer = [[{"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}]]
    for operation in parsed["operations"].values():
        (channel,) = operation["channels"]
        assert operation["action"] == "send"
        on_gateway = parsed["channels"][channel]["servers"] == ["gateway"]
        assert operation["security"] == (bearer if on_gateway else [])
    assert set(parsed["messages"]) == {message_id(*key) for key in REGISTRY} | {"StreamReset"}
    assert all(m["payload"] == "object" for m in parsed["messages"].values())
    # A v2 beside v1: two messages, both on the type's bus channels; a nested model's
    # definitions resolve.
    both = ["OrderAccepted_v1", "OrderAccepted_v2"]
    assert variants["channels"]["rabbitmq-OrderAccepted"]["messages"] == both
    assert variants["channels"]["nats-OrderAccepted"]["messages"] == both
    finance = variants["channels"]["finance"]["messages"]
    assert finance == ["PartialRefund_v1", "PlatformFeeRecorded_v1", "RevenueRecorded_v1",
                       "StreamReset"]  # fmt: skip


def test_every_stream_the_gateway_serves_is_a_channel() -> None:
    app = create_app(hub=cast(Any, None), pool=cast(Any, None), verifier=cast(Any, None),
                     config=GatewayConfig(), readiness=cast(Any, None))  # fmt: skip
    served = {
        re.sub(r"\{(\w+)\}", lambda m: "{" + to_camel(m[1]) + "}", route.path)
        for route in app.routes
        if isinstance(route, Route) and route.path.endswith("/stream")
    }
    assert served == _sse_addresses(asyncapi_document()) == set(STREAMS)
    assert GatewayConfig().max_stream_restaurants == asyncapi.MOST_RESTAURANTS


def test_each_stream_receives_what_the_routing_table_sends_it() -> None:
    document = asyncapi_document()
    for key, channel in document["channels"].items():
        if channel["address"] not in STREAMS:
            continue
        expected, access = STREAMS[channel["address"]]
        assert _message_types(channel) == expected, key
        assert "StreamReset" in channel["messages"]
        assert set(channel["parameters"]) == set(re.findall(r"\{(\w+)\}", channel["address"]))
        operation = document["operations"][key]
        assert operation["channel"] == {"$ref": f"#/channels/{key}"}
        assert operation["security"] == [{"$ref": f"#/components/securitySchemes/{access}"}]
        query = operation["bindings"]["http"]["query"]["properties"]
        assert {"access_token", "lastEventId"} <= set(query)


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda key: f"{key[0]}-v{key[1]}")
def test_the_channels_read_from_a_route_are_the_ones_render_routes_to(
    key: tuple[str, int],
) -> None:
    spec = REGISTRY[key]
    envelope = Envelope(
        event_id=str(uuid.uuid4()), event_type=spec.event_type, schema_version=spec.schema_version,
        restaurant_id=R, order_id=ORDER, customer_id=str(uuid.uuid4()), occurred_on_utc=WHEN,
        payload={**SAMPLES[spec.event_type], **PII}, derived=spec.derived,
    )  # fmt: skip
    routed = {channel.split(":", 1)[0] for channel in render(envelope).channels}
    assert channel_kinds(spec) == routed


def test_messages_carry_the_json_schemas_and_names_of_each_version() -> None:
    document = asyncapi_document()
    components = document["components"]
    for contract in contracts():
        key = message_id(contract.event_type, contract.schema_version)
        message = components["messages"][key]
        expected = {k: v for k, v in contract.schema.items() if k != "$schema"}
        assert components["schemas"][key] == expected
        assert message["payload"] == {"$ref": f"#/components/schemas/{key}"}
        assert message["x-sse-event"] == contract.spec.sse_event
        assert message["bindings"]["amqp"]["messageType"] == contract.event_type
        assert f"`{contract.cloudevents_type()}`" in message["summary"]


def _message(event_type: str = "OrderDelivered") -> Message:
    return Message(
        at=Position(3, 42, 7), event_id=str(uuid.uuid4()), event_type=event_type,
        schema_version=1, restaurant_id=R, occurred_on_utc=datetime(2026, 11, 25, 12, tzinfo=UTC),
        body=b'{"eventType":"OrderDelivered"}',
    )  # fmt: skip


class _Capture:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.max_payload = 1 << 20  # as a NATS connection reports it

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


def _address_pattern(address: str) -> str:
    return re.escape(address).replace(re.escape("{restaurantId}"), "[0-9a-f-]{36}")


async def test_bus_channels_are_where_the_publishers_publish() -> None:
    document = asyncapi_document()
    message = _message()
    amqp = rabbitmq.RabbitMqBroker(parse_publisher_url("amqp://localhost"))
    amqp._exchange = exchange = cast(Any, _Capture())
    await amqp._send(message)
    jetstream = nats_publisher.JetStreamBroker(parse_publisher_url("nats://localhost"))
    jetstream._nc = jetstream._js = js = _Capture()
    await jetstream._send(message)

    rabbit_channel = document["channels"]["rabbitmq-OrderDelivered"]
    nats_channel = document["channels"]["nats-OrderDelivered"]
    (_, sent), ((subject, _body), published) = exchange.calls[0], js.calls[0]
    assert re.fullmatch(_address_pattern(rabbit_channel["address"]), sent["routing_key"])
    assert re.fullmatch(_address_pattern(nats_channel["address"]), subject)
    assert rabbit_channel["bindings"]["amqp"]["exchange"]["name"] == amqp.exchange_name
    assert f"stream `{jetstream.stream}`" in nats_channel["description"]
    assert published["stream"] == jetstream.stream


@pytest.mark.parametrize(
    "cloudevents",
    [None, CloudEvents(), CloudEvents("/orders/eu", "https://relay.example/v1/schemas", "com.x")],
    ids=["plain", "cloudevents", "cloudevents-options"],
)
def test_bus_headers_are_the_ones_the_publishers_write(cloudevents: CloudEvents | None) -> None:
    assert asyncapi.AMQP_CLOUDEVENTS_PREFIX == rabbitmq.CLOUDEVENTS_PREFIX
    assert asyncapi.NATS_CLOUDEVENTS_PREFIX == nats_publisher.CLOUDEVENTS_PREFIX
    message = _message()
    content_type, amqp_headers = rabbitmq.amqp_properties(message, cloudevents)
    nats_headers = nats_publisher.nats_headers(message, cloudevents)
    documented = asyncapi_document()["components"]["messages"]["OrderDelivered_v1"]["headers"]

    check = jsonschema.Draft7Validator(
        documented, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    for headers in (amqp_headers, nats_headers):
        assert set(headers) <= set(documented["properties"])
        check.validate(headers)
    assert content_type == "application/json"
    if cloudevents is None:
        assert set(amqp_headers) == set(asyncapi.AMQP_HEADERS)
        assert set(nats_headers) == set(asyncapi.NATS_HEADERS)
    else:  # with CloudEvents, every documented header is written by one of them
        assert set(amqp_headers) | set(nats_headers) == set(documented["properties"])
        assert not check.is_valid({**nats_headers, "ce-type": "OrderDelivered.v2"})


async def test_served_at_asyncapi_json_without_a_token() -> None:
    app = create_app(hub=cast(Any, None), pool=cast(Any, None), verifier=cast(Any, None),
                     config=GatewayConfig(), readiness=cast(Any, None))  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://relay.example") as http:
        response = await http.get("/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document == json.loads(
        json.dumps(asyncapi_document(gateway="relay.example", protocol="https"))
    )
    gateway = document["servers"]["gateway"]
    assert (gateway["protocol"], gateway["variables"]["host"]["default"]) == (
        "https", "relay.example"
    )  # fmt: skip
