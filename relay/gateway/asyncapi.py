"""The AsyncAPI 3.0 document of everything relay sends, generated from the routing table.

Other teams integrate against relay's SSE streams and bus messages; this
document describes both so their tools (code generators, catalogues,
validators) read one contract instead of the README:

- the SSE streams (``_STREAMS``, one small table: path, the log channel kind
  it serves, who may open it) with, per stream, the messages its channel kind
  receives. Which kinds an event type reaches is read from the registry's own
  ``route``, called on a probe event, never listed by hand;
- the bus channels: per registered event type, its RabbitMQ routing key and
  its NATS subject as the publishers write them (defaults from
  ``parse_publisher_url``), the relay's headers and the CloudEvents ones;
- one message per (event type, schema version), its payload the JSON Schema
  of ``relay.events.schemas``, so a v2 beside a v1 is a second message and
  v1's never changes;
- the tokens each stream needs: one bearer-JWT security scheme per access rule.

Adding an event type (one ``EventSpec`` plus its model) adds its message and
its bus channels here with no other edit. The gateway serves this at
``GET /asyncapi.json``; ``relay schema --asyncapi FILE`` writes it.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from types import SimpleNamespace
from typing import Any

from relay.events.registry import EventSpec
from relay.events.schemas import EventContract, contracts
from relay.log import ORIGIN
from relay.publishers.base import Message, cloudevent_attributes
from relay.publishers.config import CloudEvents, parse_publisher_url

__all__ = [
    "AMQP_CLOUDEVENTS_PREFIX",
    "AMQP_HEADERS",
    "ASYNCAPI_VERSION",
    "MOST_RESTAURANTS",
    "NATS_CLOUDEVENTS_PREFIX",
    "NATS_HEADERS",
    "asyncapi_document",
    "asyncapi_text",
    "channel_kinds",
    "message_id",
]

ASYNCAPI_VERSION = "3.0.0"

# What each publisher writes besides the body (relay.publishers.rabbitmq and
# .nats; those modules import the broker clients, an optional extra, so the
# names are repeated here and a test keeps them equal).
AMQP_HEADERS = ("schemaVersion", "occurredOnUtc")
AMQP_CLOUDEVENTS_PREFIX = "cloudEvents_"
NATS_HEADERS = ("Nats-Msg-Id", "Relay-Schema-Version", "Relay-Occurred-On-Utc", "Content-Type")
NATS_CLOUDEVENTS_PREFIX = "ce-"

_JSON = "application/json"
_UUID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}
_HTTP_BINDING = "0.3.0"
_AMQP_BINDING = "0.3.0"


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


# -- who may open a stream: one security scheme per access rule (relay.gateway.app) --

_CLAIMS = "Claims: `sub` and `exp` always; `aud`/`iss` when the relay is configured with them."
_TOKEN = (
    "A JWT (HS256, or RS256/ES256 from the relay's JWKS) sent as `Authorization: Bearer`, "
    "as `?access_token=` (browsers' EventSource cannot send headers) or as the "
    "`relay_token` cookie. No or an invalid token: 401; valid but not allowed: 403. A "
    "stream ends when its token expires: reconnect with a fresh one and `Last-Event-ID`."
)


@dataclass(frozen=True)
class _Access:
    rule: str  # what the token must hold, in words
    claims: dict[str, Any]  # the claims it reads, as a JSON Schema of the token's payload


def _token_claims(required: Iterable[str] = (), **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["sub", "exp", *required],
        "properties": {"sub": {"type": "string"}, "exp": {"type": "number"}, **properties},
    }


def _listing(item: Mapping[str, Any], description: str, **more: Any) -> dict[str, Any]:
    return {"type": "array", "items": dict(item), "description": description, **more}


MOST_RESTAURANTS = 100  # per multi-restaurant stream (GatewayConfig.max_stream_restaurants)
_RESTAURANTS = _listing(_UUID, "the restaurants the holder works for", minItems=1)
_ACCESS: dict[str, _Access] = {
    "restaurantStaff": _Access(
        "`restaurant_ids` contains the path's restaurant.",
        _token_claims(["restaurant_ids"], restaurant_ids=_RESTAURANTS),
    ),
    "restaurantSetStaff": _Access(
        "`restaurant_ids` is not empty and contains every `?restaurant=` asked for "
        f"(none asked: all of them; at most {MOST_RESTAURANTS}).",
        _token_claims(["restaurant_ids"], restaurant_ids=_RESTAURANTS),
    ),
    "orderFollower": _Access(
        "`sub` is the order's customer (the outbox `customer_id` of the order's first "
        "event), or `restaurant_ids` contains the order's restaurant.",
        _token_claims(restaurant_ids=_RESTAURANTS),
    ),
    "customer": _Access(
        "`sub` is the customer's id (a UUID): the stream carries that customer's orders.",
        _token_claims(sub=_UUID),
    ),
    "finance": _Access(
        "`roles` contains `finance` and `restaurant_ids` contains the path's restaurant.",
        _token_claims(
            ["roles", "restaurant_ids"],
            roles=_listing({"type": "string"}, "roles", contains={"const": "finance"}),
            restaurant_ids=_RESTAURANTS,
        ),
    ),
    "admin": _Access(
        "`roles` contains `admin`.",
        _token_claims(
            ["roles"], roles=_listing({"type": "string"}, "roles", contains={"const": "admin"})
        ),
    ),
}


# -- the SSE streams: path, the log channel kind they serve, who may open them --


@dataclass(frozen=True)
class _Stream:
    key: str
    path: str
    kind: str  # the registry channel kind ("restaurant" for restaurant:{id}, ...)
    access: str
    title: str
    parameters: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    spans: str = "in log order"


_RESTAURANT_ID = {"restaurantId": "The restaurant's id (a UUID)."}
_STREAMS = (
    _Stream("restaurant", "/v1/restaurants/{restaurantId}/stream", "restaurant",
            "restaurantStaff", "A restaurant's kitchen board", _RESTAURANT_ID),
    _Stream("restaurants", "/v1/restaurants/stream", "restaurant", "restaurantSetStaff",
            "The kitchen boards of several restaurants on one connection",
            query={"restaurant": _listing(_UUID, "a subset of the token's restaurant_ids "
                                          "(repeat the parameter); none: all of them",
                                          maxItems=MOST_RESTAURANTS)},
            spans="in log order; the SSE id carries the set's fingerprint"),
    _Stream("order", "/v1/orders/{orderId}/stream", "order", "orderFollower",
            "One order, for the customer tracking it",
            {"orderId": "The order's id (a UUID)."}),
    _Stream("customerOrders", "/v1/me/orders/stream", "customer", "customer",
            "Every order of the customer named by the token, at any restaurant",
            spans="in log order; the SSE id carries the customer's fingerprint"),
    _Stream("finance", "/v1/restaurants/{restaurantId}/finance/stream", "finance", "finance",
            "A restaurant's finance entries", _RESTAURANT_ID),
    _Stream("admin", "/v1/admin/stream", "admin", "admin",
            "Platform administration: coupon usage at every restaurant",
            spans="in log order"),
    _Stream("coupon", "/v1/coupons/{couponId}/stream", "coupon", "admin", "One coupon's usage",
            {"couponId": "The coupon's id (a UUID)."},
            spans="in log order"),
)  # fmt: skip

_STREAM_QUERY = {
    "access_token": {"type": "string", "description": "the JWT, for clients without headers"},
    "lastEventId": {
        "type": "string",
        "description": "resume after this SSE id (as the Last-Event-ID header does)",
    },
}

# The stream's own frame: a cursor it could not resume from (frames.reset).
_RESET = "StreamReset"
_RESET_MESSAGE = {
    "name": "reset",
    "title": "Stream reset",
    "summary": "The cursor offered could not be resumed (malformed, another stream's, or "
    "older than retention): reload state from the polling endpoint, then read on.",
    "contentType": _JSON,
    "payload": {
        "type": "object",
        "properties": {
            "reason": {"type": "string"},
            "cursor": {"type": "string", "description": "the cursor the stream starts from"},
        },
        "required": ["reason", "cursor"],
        "additionalProperties": False,
    },
    "x-sse-event": "reset",
}


# -- the registry, read through its own routes --

_PROBE = str(uuid.UUID(int=1))


def channel_kinds(spec: EventSpec) -> frozenset[str]:
    """The kinds of channel (``restaurant``, ``order``, ``customer``, …) ``spec``'s
    route sends an event to, when the event has every routing column."""
    # A route reads ids from the validated model too (CouponUsed's couponId).
    model = SimpleNamespace(**dict.fromkeys(spec.model.model_fields, _PROBE))
    channels = spec.route(_PROBE, _PROBE, _PROBE, model)
    return frozenset(channel.split(":", 1)[0] for channel in channels)


def message_id(event_type: str, schema_version: int) -> str:
    """``OrderAccepted_v1``: the message's key in ``components/messages`` and in
    each channel (AsyncAPI allows no dot in a channel's message keys)."""
    return f"{event_type}_v{schema_version}"


def asyncapi_document(*, gateway: str = "localhost:8000", protocol: str = "http") -> dict[str, Any]:
    """The whole document, a fresh copy; ``gateway`` (host[:port]) and ``protocol``
    say where the SSE streams are reached (the default of its ``host`` variable)."""
    published = contracts()
    amqp = parse_publisher_url("amqp://localhost").options
    nats = parse_publisher_url("nats://localhost").options
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {_RESET: _RESET_MESSAGE}
    for contract in published:
        key = message_id(contract.event_type, contract.schema_version)
        schemas[key] = _hoisted(contract.schema, key, schemas)
        messages[key] = _message(contract, key)

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for stream in _STREAMS:
        received = [c for c in published if stream.kind in channel_kinds(c.spec)]
        channels[stream.key] = _sse_channel(stream, received)
        operations[stream.key] = _sse_operation(stream)
    for event_type in sorted({c.event_type for c in published}):
        versions = [c for c in published if c.event_type == event_type]
        for key, channel in (
            (f"rabbitmq-{event_type}", _amqp_channel(event_type, versions, amqp)),
            (f"nats-{event_type}", _nats_channel(event_type, versions, nats)),
        ):
            channels[key] = channel
            operations[key] = _bus_operation(key, channel)

    document = {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:relay:asyncapi",
        "info": {
            "title": "relay: order events",
            "version": _relay_version(),
            "description": _INFO,
            "license": {"name": "MIT"},
        },
        "defaultContentType": _JSON,
        "servers": _servers(gateway, protocol, amqp, nats),
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                **{
                    name: {
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "JWT",
                        "description": f"{access.rule} {_CLAIMS} {_TOKEN}",
                        "x-claims": access.claims,
                    }
                    for name, access in _ACCESS.items()
                },
                "brokerCredentials": {
                    "type": "userPassword",
                    "description": "The broker's own users: credentials in the broker URL.",
                },
            },
        },
    }
    return copy.deepcopy(document)  # the tables above are shared: callers may annotate it


def asyncapi_text(*, gateway: str = "localhost:8000", protocol: str = "http") -> str:
    """The document as written and served: stable key order, trailing newline."""
    document = asyncapi_document(gateway=gateway, protocol=protocol)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


_INFO = (
    "Every event relay streams over Server-Sent Events and publishes to RabbitMQ and NATS "
    "JetStream, generated from its routing table. An SSE frame is `id:` (an opaque cursor: "
    "reconnect with `Last-Event-ID` to resume without gaps), `event:` (the message's "
    "`x-sse-event`) and `data:` (the payload, one JSON object). A bus message's body is the "
    "same JSON object, its message id the `eventId`. Each (event type, schema version) is "
    "one message with its own JSON Schema (also at `/v1/schemas/{eventType}/{version}.json`); "
    "a new version is a new message, and an old one never changes under its consumers."
)


def _relay_version() -> str:
    try:
        return version("relay")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


def _servers(
    gateway: str, protocol: str, amqp: Mapping[str, str], nats: Mapping[str, str]
) -> dict[str, Any]:
    def server(host: str, proto: str, description: str, **more: Any) -> dict[str, Any]:
        return {
            "host": "{host}",
            "protocol": proto,
            "description": description,
            "variables": {"host": {"default": host, "description": "host[:port]"}},
            **more,
        }

    return {
        "gateway": server(
            gateway, protocol,
            "relay's HTTP gateway: each stream is a GET answered with text/event-stream "
            "(Server-Sent Events).",
        ),
        "rabbitmq": server(
            "localhost:5672", "amqp",
            f"RabbitMQ, when `RELAY_PUBLISHERS` lists an amqp:// URL: a durable topic exchange "
            f"(`exchange=`, default `{amqp['exchange']}`), persistent messages.",
            protocolVersion="0.9.1", security=[_ref("components", "securitySchemes",
                                                   "brokerCredentials")],
        ),
        "nats": server(
            "localhost:4222", "nats",
            f"NATS JetStream, when `RELAY_PUBLISHERS` lists a nats:// URL: stream "
            f"`{nats['stream']}` (`stream=`) on subjects `{nats['prefix']}.>` (`prefix=`).",
            security=[_ref("components", "securitySchemes", "brokerCredentials")],
        ),
    }  # fmt: skip


def _hoisted(schema: dict[str, Any], key: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """The payload schema as an AsyncAPI schema object: no ``$schema`` (AsyncAPI
    schemas are its own JSON Schema dialect) and the model's nested ``$defs``
    moved to ``components/schemas`` as ``{key}.{name}``: a ``#/`` reference
    inside the document resolves from the document's root."""
    schema.pop("$schema", None)
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def moved(node: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(node)
        for name in definitions:
            text = text.replace(
                json.dumps(f"#/$defs/{name}"), json.dumps(f"#/components/schemas/{key}.{name}")
            )
        result: dict[str, Any] = json.loads(text)
        return result

    for name, definition in definitions.items():
        schemas[f"{key}.{name}"] = moved(definition)
    return moved(schema)


def _message(contract: EventContract, key: str) -> dict[str, Any]:
    spec = contract.spec
    return {
        "name": spec.event_type,
        "title": f"{spec.event_type} v{spec.schema_version}",
        "summary": (
            f"SSE `event: {spec.sse_event}`; bus type `{spec.event_type}`, schema version "
            f"{spec.schema_version}, CloudEvents type `{contract.cloudevents_type()}`."
        ),
        "contentType": _JSON,
        "headers": _bus_headers(contract),
        "payload": _ref("components", "schemas", key),
        "bindings": {"amqp": {"messageType": spec.event_type, "bindingVersion": _AMQP_BINDING}},
        "x-sse-event": spec.sse_event,
    }


def _bus_headers(contract: EventContract) -> dict[str, Any]:
    """The headers a bus message carries (SSE frames carry none): the relay's own
    always, the CloudEvents attributes with ``format=cloudevents``, each named as
    its broker's protocol binding says."""
    event_type, version = contract.event_type, contract.schema_version
    attributes = _cloudevents_schemas(contract)
    properties: dict[str, Any] = {
        "schemaVersion": {"type": "integer", "const": version},
        "occurredOnUtc": _TIME,
        **{
            AMQP_CLOUDEVENTS_PREFIX + name: schema
            for name, schema in attributes.items()
            if name != "datacontenttype"  # the message's content-type property instead
        },
        "Nats-Msg-Id": {**_UUID, "description": "the eventId (JetStream's dedupe)"},
        "Relay-Schema-Version": {"type": "string", "const": str(version)},
        "Relay-Occurred-On-Utc": _TIME,
        "Content-Type": {"type": "string", "const": _JSON},
        **{NATS_CLOUDEVENTS_PREFIX + name: schema for name, schema in attributes.items()},
    }
    return {
        "type": "object",
        "description": (
            f"Bus messages only. RabbitMQ: headers {', '.join(AMQP_HEADERS)}; properties "
            f"message_id = eventId, type = {event_type}, content_type {_JSON}. NATS: "
            f"headers {', '.join(NATS_HEADERS)}. With format=cloudevents also the "
            f"CloudEvents attributes (binary mode): {AMQP_CLOUDEVENTS_PREFIX}{{name}} on "
            f"RabbitMQ (datacontenttype is content_type), {NATS_CLOUDEVENTS_PREFIX}{{name}} "
            "on NATS (values percent-encoded)."
        ),
        "properties": properties,
    }


def _cloudevents_schemas(contract: EventContract) -> dict[str, dict[str, Any]]:
    """Each CloudEvents attribute the publishers write (``cloudevent_attributes``),
    as a schema that holds whatever the publisher's options are."""
    probe = Message(
        at=ORIGIN, event_id=_PROBE, event_type=contract.event_type,
        schema_version=contract.schema_version, restaurant_id=_PROBE,
        occurred_on_utc=datetime(2000, 1, 1, tzinfo=UTC), body=b"{}",
    )  # fmt: skip
    cloudevents_type = re.escape(contract.cloudevents_type())
    schema_file = re.escape(f"/{contract.path}")
    known: dict[str, dict[str, Any]] = {
        "specversion": {"type": "string", "const": "1.0"},
        "id": {**_UUID, "description": "the eventId"},
        "source": {"type": "string", "description": "option source=, default /relay"},
        "type": {
            "type": "string",
            "pattern": f"^(.+\\.)?{cloudevents_type}$",
            "description": "{type_prefix.}{eventType}.v{schemaVersion}",
        },
        "subject": {**_UUID, "description": "the restaurantId"},
        "time": {**_TIME, "description": "occurredOnUtc"},
        "dataschema": {
            "type": "string",
            "pattern": f"^({re.escape(contract.schema_id)}|.+{schema_file})$",
            "description": "{schemas=}/{eventType}/{version}.json, or the schema's $id",
        },
        "datacontenttype": {"type": "string", "const": _JSON},
    }
    return {
        name: known.get(name, {"type": "string"})
        for name in cloudevent_attributes(probe, CloudEvents())
    }


def _parameters(names: Mapping[str, str]) -> dict[str, Any]:
    return {name: {"description": text} for name, text in names.items()}


def _channel_messages(received: Iterable[EventContract]) -> dict[str, Any]:
    return {
        key: _ref("components", "messages", key)
        for key in (message_id(c.event_type, c.schema_version) for c in received)
    }


def _sse_channel(stream: _Stream, received: list[EventContract]) -> dict[str, Any]:
    types = ", ".join(sorted({c.event_type for c in received})) or "none yet"
    return {
        "address": stream.path,
        "title": stream.title,
        "description": (
            f"GET {stream.path}: Server-Sent Events of relay's `{stream.kind}` channel "
            f"({types}), {stream.spans}. Who may open it: {_ACCESS[stream.access].rule}"
        ),
        "servers": [_ref("servers", "gateway")],
        "parameters": _parameters(stream.parameters),
        "messages": {**_channel_messages(received), _RESET: _ref("components", "messages",
                                                                   _RESET)},
    }  # fmt: skip


def _sse_operation(stream: _Stream) -> dict[str, Any]:
    query = {"type": "object", "properties": {**_STREAM_QUERY, **stream.query}}
    return {
        "action": "send",
        "channel": _ref("channels", stream.key),
        "title": f"Stream: {stream.title}",
        "summary": f"relay sends each event of the stream once, {stream.spans}.",
        "security": [_ref("components", "securitySchemes", stream.access)],
        "bindings": {"http": {"method": "GET", "query": query, "bindingVersion": _HTTP_BINDING}},
    }


def _amqp_channel(
    event_type: str, versions: list[EventContract], options: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "address": f"{event_type}.{{restaurantId}}",
        "title": f"RabbitMQ: {event_type}",
        "description": (
            f"Routing key `{event_type}.{{restaurantId}}` on exchange "
            f"`{options['exchange']}`: bind a queue to `{event_type}.*` for every restaurant. "
            "At least once: deduplicate by message_id (the eventId)."
        ),
        "servers": [_ref("servers", "rabbitmq")],
        "parameters": _parameters(_RESTAURANT_ID),
        "messages": _channel_messages(versions),
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": options["exchange"],
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }


def _nats_channel(
    event_type: str, versions: list[EventContract], options: Mapping[str, str]
) -> dict[str, Any]:
    subject = f"{options['prefix']}.{event_type}"
    return {
        "address": f"{subject}.{{restaurantId}}",
        "title": f"NATS JetStream: {event_type}",
        "description": (
            f"Subject `{subject}.{{restaurantId}}` in stream `{options['stream']}`: consume "
            f"`{subject}.>` for every restaurant. At least once: the Nats-Msg-Id header is "
            "the eventId (JetStream drops repeats within its duplicate window)."
        ),
        "servers": [_ref("servers", "nats")],
        "parameters": _parameters(_RESTAURANT_ID),
        "messages": _channel_messages(versions),
    }


def _bus_operation(key: str, channel: Mapping[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": "send",
        "channel": _ref("channels", key),
        "title": f"Publish: {channel['title']}",
        "summary": "relay publishes each event of this type, in order per restaurant.",
    }
    if key.startswith("rabbitmq-"):
        operation["bindings"] = {
            "amqp": {"deliveryMode": 2, "bindingVersion": _AMQP_BINDING}  # persistent
        }
    return operation
