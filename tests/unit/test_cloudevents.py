"""CloudEvents on the bus, opt-in per publisher URL: binary content mode, each broker's binding.

The headers are read back with the official SDK's decoders: its AMQP binding
for RabbitMQ, and for NATS its HTTP decoder on the ``ce-`` headers alone (the
SDK has no NATS binding; NATS's binary mode is HTTP's header mapping and
percent-encoding, with datacontenttype as ``ce-datacontenttype``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import amqp, http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from relay.errors import ConfigError
from relay.events import Envelope, render
from relay.log import Position
from relay.publishers.base import Message
from relay.publishers.config import CloudEvents, parse_publisher_url
from relay.publishers.nats import nats_headers
from relay.publishers.rabbitmq import amqp_properties

R = "8e0f1c2a-3b4c-4d5e-8f60-7a8b9c0d1e2f"  # ids as the log reads them: text
WHEN = datetime(2026, 11, 25, 12, 0, 0, 250000, tzinfo=UTC)


def message(event_type: str = "CouponUsed", schema_version: int = 1) -> Message:
    event_id = str(uuid.uuid4())
    payload = {"couponId": str(uuid.uuid4()), "previousUsageCount": 1, "newUsageCount": 2,
               "usedAt": "2026-11-25T12:00:00Z"}  # fmt: skip
    body = render(
        Envelope(event_id, event_type, schema_version, R, None, None, WHEN, payload)
    ).json.encode()
    return Message(at=Position(1, 700, 1), event_id=event_id, event_type=event_type,
                   schema_version=schema_version, restaurant_id=R, occurred_on_utc=WHEN,
                   body=body)  # fmt: skip


def same(event: CloudEvent) -> tuple[dict[str, Any], Any]:
    """What makes two events the same (the SDK's events compare by identity)."""
    return event.get_attributes(), event.get_data()


def expected(
    m: Message, *, source: str = "/relay", dataschema: str | None = None
) -> tuple[dict[str, Any], Any]:
    event = CloudEvent(
        {
            "specversion": "1.0",
            "id": str(m.event_id),
            "source": source,
            "type": f"{m.event_type}.v{m.schema_version}",
            "subject": R,
            "time": WHEN,
            "dataschema": dataschema or f"urn:relay:schema:{m.event_type}:{m.schema_version}",
            "datacontenttype": "application/json",
        },
        JSONFormat().read_data(m.body, "application/json"),
    )
    return same(event)


def from_rabbitmq(m: Message, options: CloudEvents) -> CloudEvent:
    content_type, headers = amqp_properties(m, options)
    wire = amqp.AMQPMessage({"content-type": content_type}, headers, m.body)
    event = amqp.from_binary(wire, JSONFormat(), CloudEvent)
    assert isinstance(event, CloudEvent)
    return event


def from_nats(m: Message, options: CloudEvents) -> CloudEvent:
    headers = nats_headers(m, options)
    attributes = {k: v for k, v in headers.items() if k.startswith("ce-")}
    event = http.from_binary(http.HTTPMessage(attributes, m.body), JSONFormat(), CloudEvent)
    assert isinstance(event, CloudEvent)
    return event


def test_plain_json_publishers_send_exactly_what_they_sent_before() -> None:
    m = message()
    assert amqp_properties(m, None) == (
        "application/json",
        {"schemaVersion": 1, "occurredOnUtc": "2026-11-25T12:00:00.250000Z"},
    )
    assert nats_headers(m, None) == {
        "Nats-Msg-Id": str(m.event_id),
        "Relay-Schema-Version": "1",
        "Relay-Occurred-On-Utc": "2026-11-25T12:00:00.250000Z",
        "Content-Type": "application/json",
    }


def test_amqp_binding_cloudevents_prefix_and_content_type_property() -> None:
    m = message()
    content_type, headers = amqp_properties(m, CloudEvents())
    assert content_type == "application/json"  # datacontenttype: the content-type property
    assert {k for k in headers if k.startswith("cloudEvents_")} == {
        "cloudEvents_specversion", "cloudEvents_id", "cloudEvents_source", "cloudEvents_type",
        "cloudEvents_subject", "cloudEvents_time", "cloudEvents_dataschema",
    }  # fmt: skip
    assert headers["schemaVersion"] == 1  # the plain headers stay for existing consumers
    assert same(from_rabbitmq(m, CloudEvents())) == expected(m)


def test_nats_binding_ce_headers_include_datacontenttype() -> None:
    m = message()
    headers = nats_headers(m, CloudEvents())
    assert headers["ce-datacontenttype"] == "application/json"
    assert headers["ce-time"] == "2026-11-25T12:00:00.250000Z"
    assert headers["Content-Type"] == "application/json"  # binary mode, not structured
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == str(m.event_id)
    assert same(from_nats(m, CloudEvents())) == expected(m)


def test_nats_header_values_are_percent_encoded_and_decode_back() -> None:
    m = message()
    source = '/cuisine/café"déjà%20vu"'  # non-ASCII, a double quote, a literal %
    options = CloudEvents(source=source, type_prefix="com.example.orders")
    headers = nats_headers(m, options)
    assert headers["ce-source"] == "/cuisine/caf%C3%A9%22d%C3%A9j%C3%A0%2520vu%22"
    assert all(0x21 <= ord(c) <= 0x7E for v in headers.values() for c in v.replace(" ", "!"))
    event = from_nats(m, options)
    assert event.get_source() == source
    assert event.get_type() == "com.example.orders.CouponUsed.v1"
    assert from_rabbitmq(m, options).get_source() == source  # AMQP strings carry it as is


def test_dataschema_points_at_the_served_schema_when_the_base_is_known() -> None:
    m = message()
    options = CloudEvents(schemas="https://relay.example.com/v1/schemas/")
    served = "https://relay.example.com/v1/schemas/CouponUsed/1.json"
    assert same(from_rabbitmq(m, options)) == expected(m, dataschema=served)
    assert same(from_nats(m, options)) == expected(m, dataschema=served)


def test_format_cloudevents_is_opt_in_per_url() -> None:
    assert parse_publisher_url("amqp://h/").cloudevents is None
    assert parse_publisher_url("nats://h:4222?format=json").cloudevents is None
    assert parse_publisher_url("nats://h:4222?format=cloudevents").cloudevents == CloudEvents()
    config = parse_publisher_url(
        "amqp://guest:pw@h/?format=cloudevents&source=urn:example:orders"
        "&schemas=https://relay.example.com/v1/schemas&type_prefix=com.example"
    )
    assert config.cloudevents == CloudEvents(
        "urn:example:orders", "https://relay.example.com/v1/schemas", "com.example"
    )
    assert config.name == "amqp://h#relay.events"  # the offsets' key ignores the format


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://h/?format=avro", "format must be json or cloudevents, not 'avro'"),
        ("nats://h?source=/x", "source only apply with format=cloudevents"),
        ("nats://h?format=cloudevents&source=", "source must be non-empty, without spaces"),
        ("nats://h?format=cloudevents&source=/a+b", "source must be non-empty, without spaces"),
        ("nats://h?format=cloudevents&schemas=/v1/schemas", "schemas must be an absolute URL"),
    ],
)
def test_bad_cloudevents_options_are_one_clear_line(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parse_publisher_url(url)
