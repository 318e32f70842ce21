"""JSON Schemas of the broadcast JSON, generated from the models (issue: event contracts).

The schema of each (event type, schema version) must describe exactly what
``render`` broadcasts, be committed under docs/schemas/ as generated, and
appear for a new event type or version with no edit beyond its registry
entry and its model.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import httpx
import jsonschema
import pytest

from relay.events import REGISTRY, Envelope, EventSpec, render
from relay.events.base import Contract
from relay.events.orders import OrderStatusChanged
from relay.events.schemas import (
    cloudevents_type,
    contract_for,
    contracts,
    dataschema,
    json_schema_files,
    schema_id,
    write_json_schemas,
)
from relay.events.types import Money
from relay.gateway.app import GatewayConfig, create_app
from relay.gateway.asyncapi import asyncapi_document

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "schemas"
REGENERATE = "run `relay schema --json-schema docs/schemas` and commit the result"

R = "8e0f1c2a-3b4c-4d5e-8f60-7a8b9c0d1e2f"  # ids as the log reads them: text
ORDER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
WHEN = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
_ORDER_IDS = {"orderId": ORDER, "restaurantId": R}
_STATUS = {**_ORDER_IDS, "orderNumber": 1001, "lastUpdateTimestamp": "2026-11-25T12:00:00+01:00",
           "estimatedDeliveryTime": None, "actualDeliveryTime": None}  # fmt: skip
_FINANCE = {**_ORDER_IDS, "restaurantAccountId": str(uuid.uuid4()), "amount": "1E+3",
            "newBalance": Decimal("-12.5")}  # fmt: skip

# A payload as a producer writes it, per registered type (with PII the relay drops).
SAMPLES: dict[str, dict[str, Any]] = {
    "OrderPaymentSucceeded": {**_ORDER_IDS, "orderNumber": "A-1", "status": "Paid",
                              "total": "42.50", "placementTimestamp": "2026-11-25T11:59:00Z",
                              "lastUpdateTimestamp": "2026-11-25T12:00:00.250Z"},
    "OrderPaymentFailed": {**_ORDER_IDS, "status": "PaymentFailed",
                           "failureTimestamp": "2026-11-25T12:00:00Z"},
    "OrderAccepted": {**_STATUS, "newStatus": "Accepted"},
    "OrderPreparing": {**_STATUS, "newStatus": "Preparing"},
    "OrderReadyForDelivery": {**_STATUS, "newStatus": "ReadyForDelivery"},
    "OrderDelivered": {**_STATUS, "newStatus": "Delivered",
                       "actualDeliveryTime": "2026-11-25T12:30:00Z"},
    "OrderRejected": {**_STATUS, "newStatus": "Rejected", "occurredOnUtc": "2026-11-25T12:00:01Z"},
    "OrderCancelled": {**_STATUS, "newStatus": "Cancelled"},
    "CouponUsed": {"couponId": str(uuid.uuid4()), "previousUsageCount": 0, "newUsageCount": 1,
                   "usedAt": "2026-11-25T12:00:00Z"},
    "RevenueRecorded": _FINANCE,
    "PlatformFeeRecorded": _FINANCE,
    "OrderDelayAlert": {**_ORDER_IDS, "kind": "NotAccepted", "expectedBy": "2026-11-25T12:03:00Z",
                        "detectedAt": "2026-11-25T12:03:01Z"},
}  # fmt: skip
PII = {"customerName": "Ada Lovelace", "deliveryAddress": "12 Engine Lane"}


def broadcast(spec: EventSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """What SSE clients and the bus receive for ``payload``: ``render``'s own output."""
    envelope = Envelope(
        event_id=str(uuid.uuid4()), event_type=spec.event_type, schema_version=spec.schema_version,
        restaurant_id=R, order_id=ORDER, customer_id=None, occurred_on_utc=WHEN,
        payload={**payload, **PII}, derived=spec.derived,
    )  # fmt: skip
    return render(envelope).data


def validator(spec: EventSpec) -> jsonschema.Draft202012Validator:
    formats = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert {"date-time", "uuid"} <= set(formats.checkers)  # else formats pass unchecked
    schema = contract_for(spec.event_type, spec.schema_version).schema
    return jsonschema.Draft202012Validator(schema, format_checker=formats)


def committed_files() -> dict[str, str]:
    return {p.relative_to(COMMITTED).as_posix(): p.read_text() for p in COMMITTED.glob("*/*.json")}


def test_committed_schemas_are_exactly_the_generated_ones() -> None:
    generated, committed = json_schema_files(), committed_files()
    missing = sorted(generated.keys() - committed.keys())
    stale = sorted(p for p in generated.keys() & committed.keys() if generated[p] != committed[p])
    extra = sorted(committed.keys() - generated.keys())
    assert not (missing or stale or extra), (
        f"docs/schemas differs from the models (missing {missing}, changed {stale}, "
        f"no longer registered {extra}): {REGENERATE}"
    )


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda key: f"{key[0]}-v{key[1]}")
def test_every_broadcast_validates_against_its_schema(key: tuple[str, int]) -> None:
    spec = REGISTRY[key]
    jsonschema.Draft202012Validator.check_schema(contract_for(*key).schema)
    data = broadcast(spec, SAMPLES[spec.event_type])
    check = validator(spec)
    check.validate(data)
    # The schema is the whitelist and the exact serialized form, not a loose shape.
    for wrong in (
        {**data, "customerName": "Ada Lovelace"},  # PII never passes
        {k: v for k, v in data.items() if k != "eventId"},  # every field is always there
        {**data, "eventType": "Other"},
        {**data, "schemaVersion": spec.schema_version + 1},
        {**data, "occurredOnUtc": "yesterday"},
    ):
        assert not check.is_valid(wrong), wrong


def test_the_samples_cover_every_registered_type() -> None:
    assert {event_type for event_type, _ in REGISTRY} == set(SAMPLES)


def test_money_is_a_decimal_string_and_times_are_iso_strings() -> None:
    spec = REGISTRY[("RevenueRecorded", 1)]
    data = broadcast(spec, SAMPLES["RevenueRecorded"])
    assert (data["amount"], data["newBalance"]) == ("1000", "-12.5")
    check = validator(spec)
    assert not check.is_valid({**data, "amount": 1000})  # a JSON number is not the contract
    assert not check.is_valid({**data, "occurredOnUtc": 1764072000})


def test_a_status_schema_admits_only_its_own_status() -> None:
    spec = REGISTRY[("OrderAccepted", 1)]
    data = broadcast(spec, SAMPLES["OrderAccepted"])
    assert not validator(spec).is_valid({**data, "newStatus": "Preparing"})


def test_a_model_change_without_a_schema_change_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Changed(Contract):
        order_id: uuid.UUID
        restaurant_id: uuid.UUID
        status: str
        failure_timestamp: datetime
        reason: str | None = None  # the change nobody regenerated the schema for

    old = REGISTRY[("OrderPaymentFailed", 1)]
    changed = EventSpec("OrderPaymentFailed", 1, Changed, old.sse_event, old.route)
    monkeypatch.setitem(cast(dict[tuple[str, int], EventSpec], REGISTRY), ("OrderPaymentFailed", 1),
                        changed)  # fmt: skip
    generated, committed = json_schema_files(), committed_files()
    assert [p for p in generated if generated[p] != committed.get(p)] == [
        "OrderPaymentFailed/1.json"
    ]
    with pytest.raises(AssertionError, match="run `relay schema --json-schema docs/schemas`"):
        test_committed_schemas_are_exactly_the_generated_ones()


class TipAdded(Contract):
    """A throwaway event type: a customer tipped the restaurant."""

    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    amount: Money


async def test_a_new_type_is_one_registry_entry_plus_its_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = EventSpec(
        "TipAdded", 1, TipAdded, "TipAdded", lambda restaurant, *_: (f"restaurant:{restaurant}",)
    )
    monkeypatch.setitem(cast(dict[tuple[str, int], EventSpec], REGISTRY), ("TipAdded", 1), spec)

    assert "TipAdded/1.json" in json_schema_files()
    written = write_json_schemas(tmp_path)
    assert written == sorted(json_schema_files())
    schema = json.loads((tmp_path / "TipAdded" / "1.json").read_text())
    assert schema["$id"] == "urn:relay:schema:TipAdded:1"
    assert schema["properties"]["amount"] == {"type": "string"}
    validator(spec).validate(broadcast(spec, {**_ORDER_IDS, "amount": "2.50"}))
    assert cloudevents_type("TipAdded", 1) == "TipAdded.v1"
    assert dataschema("TipAdded", 1) == schema["$id"]

    # Served too, beside the others.
    app = create_app(hub=cast(Any, None), pool=cast(Any, None), verifier=cast(Any, None),
                     config=GatewayConfig(), readiness=cast(Any, None))  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as http:
        served = await http.get("/v1/schemas/TipAdded/1.json")
        index = (await http.get("/v1/schemas")).json()["schemas"]
        assert (await http.get("/v1/schemas/TipAdded/2.json")).status_code == 404
        asyncapi = (await http.get("/asyncapi.json")).json()
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/schema+json"
    assert served.json() == schema
    assert {"eventType": "TipAdded", "schemaVersion": 1, "id": schema["$id"],
            "url": "/v1/schemas/TipAdded/1.json"} in index  # fmt: skip
    assert len(index) == len(REGISTRY)

    # Its AsyncAPI message, on the streams its route reaches and on both buses.
    assert asyncapi == asyncapi_document(gateway="relay")
    assert asyncapi["components"]["schemas"]["TipAdded_v1"]["$id"] == schema["$id"]
    message = asyncapi["components"]["messages"]["TipAdded_v1"]
    assert message["payload"] == {"$ref": "#/components/schemas/TipAdded_v1"}
    assert "CloudEvents type `TipAdded.v1`" in message["summary"]
    carrying = {key for key, c in asyncapi["channels"].items() if "TipAdded_v1" in c["messages"]}
    assert carrying == {"restaurant", "restaurants", "rabbitmq-TipAdded", "nats-TipAdded"}


def test_write_json_schemas_removes_a_type_no_longer_registered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = EventSpec("TipAdded", 1, TipAdded, "TipAdded", REGISTRY[("CouponUsed", 1)].route)
    notes = tmp_path / "README" / "notes.json"
    notes.parent.mkdir()
    notes.write_text('{"not": "ours"}')
    with monkeypatch.context() as patch:
        patch.setitem(cast(dict[tuple[str, int], EventSpec], REGISTRY), ("TipAdded", 1), spec)
        write_json_schemas(tmp_path)
    assert write_json_schemas(tmp_path) == ["TipAdded/1.json"]  # removed
    assert not (tmp_path / "TipAdded").exists()
    assert notes.exists()  # not one of ours
    assert write_json_schemas(tmp_path) == []  # idempotent


class OrderAcceptedV2(OrderStatusChanged):
    """OrderAccepted v2: the kitchen's promised preparation time."""

    preparation_minutes: int


def test_a_v2_beside_v1_leaves_v1_consumers_unaffected(monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = REGISTRY[("OrderAccepted", 1)]
    v2 = EventSpec("OrderAccepted", 2, OrderAcceptedV2, v1.sse_event, v1.route,
                   expected_status="Accepted")  # fmt: skip
    before = contract_for("OrderAccepted", 1).schema_text
    document_before = asyncapi_document()
    monkeypatch.setitem(cast(dict[tuple[str, int], EventSpec], REGISTRY), ("OrderAccepted", 2), v2)

    files = json_schema_files()
    assert {p for p in files if p.startswith("OrderAccepted/")} == {
        "OrderAccepted/1.json", "OrderAccepted/2.json"
    }  # fmt: skip
    assert files["OrderAccepted/1.json"] == before == committed_files()["OrderAccepted/1.json"]
    second = json.loads(files["OrderAccepted/2.json"])
    assert second["properties"]["preparationMinutes"] == {"type": "integer"}
    assert second["properties"]["schemaVersion"]["const"] == 2

    old = broadcast(v1, SAMPLES["OrderAccepted"])
    new = broadcast(v2, {**SAMPLES["OrderAccepted"], "preparationMinutes": 12})
    validator(v1).validate(old)
    validator(v2).validate(new)
    assert not validator(v1).is_valid(new)  # a v2 object is not a v1 object...
    assert cloudevents_type("OrderAccepted", 1) != cloudevents_type("OrderAccepted", 2)
    assert dataschema("OrderAccepted", 1) != dataschema("OrderAccepted", 2)
    # ...and never travels under v1's CloudEvents type or schema: a v1 consumer
    # filtering on its type sees exactly what it saw before.
    assert [c.schema_id for c in contracts() if c.event_type == "OrderAccepted"] == [
        schema_id("OrderAccepted", 1), schema_id("OrderAccepted", 2)
    ]  # fmt: skip

    # Two AsyncAPI messages, v1's as it was; the bus channels carry both versions.
    document = asyncapi_document()
    components, old_components = document["components"], document_before["components"]
    assert [k for k in components["messages"] if k.startswith("OrderAccepted_")] == [
        "OrderAccepted_v1", "OrderAccepted_v2"
    ]  # fmt: skip
    for part in ("messages", "schemas"):
        assert components[part]["OrderAccepted_v1"] == old_components[part]["OrderAccepted_v1"]
    assert components["schemas"]["OrderAccepted_v2"]["$id"] == second["$id"]
    for channel in ("rabbitmq-OrderAccepted", "nats-OrderAccepted", "restaurant"):
        assert {"OrderAccepted_v1", "OrderAccepted_v2"} <= set(
            document["channels"][channel]["messages"]
        )
