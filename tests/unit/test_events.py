"""The event contract (SPEC §1): validation, whitelisting, routing, exact money and time."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import InvalidPayload, UnknownEventType
from relay.events import REGISTRY, Envelope, kitchen_of, known_event_types, render, spec_for
from relay.events.registry import NUMBERLESS_TYPES
from relay.events.stored import decode_payload, render_stored
from relay.events.types import MAX_ORDER_NUMBER

R = uuid.UUID("8e0f1c2a-3b4c-4d5e-8f60-7a8b9c0d1e2f")
ORDER = uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
C = uuid.UUID("11111111-2222-4333-8444-555555555555")
E = uuid.UUID("99999999-8888-4777-8666-555555555555")
WHEN = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def envelope(event_type: str, payload: dict[str, Any], **kw: Any) -> Envelope:
    """An outbox row's envelope, its ids as text as the log reads them."""
    return Envelope(
        event_id=str(kw.get("event_id", E)),
        event_type=event_type,
        schema_version=kw.get("schema_version", 1),
        restaurant_id=str(kw.get("restaurant_id", R)),
        order_id=_text(kw.get("order_id", ORDER)),
        customer_id=_text(kw.get("customer_id", C)),
        occurred_on_utc=kw.get("occurred_on_utc", WHEN),
        payload=payload,
        derived=kw.get("derived", False),
    )


def _text(value: uuid.UUID | str | None) -> str | None:
    return None if value is None else str(value)


def _ids() -> tuple[str, str, int, str, str, str]:
    """The columns before the payload: event id, type, version, restaurant, order, customer."""
    return str(E), "OrderAccepted", 1, str(R), str(ORDER), str(C)


def pascal(payload: dict[str, Any]) -> dict[str, Any]:
    return {k[0].upper() + k[1:]: v for k, v in payload.items()}


PII = {"customerName": "Ada Lovelace", "deliveryAddress": "12 Engine Lane", "phone": "+44 1"}
COMMON = {
    "eventId": str(E),
    "schemaVersion": 1,
}

CASES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "OrderPaymentSucceeded",
        {
            "orderId": str(ORDER),
            "restaurantId": str(R),
            "orderNumber": "A-1001",
            "status": "Paid",
            "total": "42.50",
            "placementTimestamp": "2026-11-25T11:59:00Z",
            "lastUpdateTimestamp": "2026-11-25T12:00:00.250Z",
            "estimatedDeliveryTime": None,
        },
        "OrderPaymentSucceeded",
        {
            "orderId": str(ORDER),
            "restaurantId": str(R),
            "orderNumber": "A-1001",
            "status": "Paid",
            "total": "42.50",
            "placementTimestamp": "2026-11-25T11:59:00Z",
            "lastUpdateTimestamp": "2026-11-25T12:00:00.250000Z",
            "estimatedDeliveryTime": None,
            "eventType": "OrderPaymentSucceeded",
            "occurredOnUtc": "2026-11-25T12:00:00Z",
        },
    ),
    (
        "OrderPaymentFailed",
        {
            "orderId": str(ORDER),
            "restaurantId": str(R),
            "status": "PaymentFailed",
            "failureTimestamp": "2026-11-25T13:00:00+01:00",
        },
        "OrderPaymentFailed",
        {
            "orderId": str(ORDER),
            "restaurantId": str(R),
            "status": "PaymentFailed",
            "failureTimestamp": "2026-11-25T12:00:00Z",
            "eventType": "OrderPaymentFailed",
            "occurredOnUtc": "2026-11-25T12:00:00Z",
        },
    ),
]
for _type, _status in [
    ("OrderAccepted", "Accepted"),
    ("OrderPreparing", "Preparing"),
    ("OrderReadyForDelivery", "ReadyForDelivery"),
    ("OrderDelivered", "Delivered"),
    ("OrderRejected", "Rejected"),
    ("OrderCancelled", "Cancelled"),
]:
    delivered = "2026-11-25T12:30:00Z" if _status == "Delivered" else None
    CASES.append(
        (
            _type,
            {
                "orderId": str(ORDER),
                "restaurantId": str(R),
                "orderNumber": 1001,
                "newStatus": _status,
                "lastUpdateTimestamp": "2026-11-25T12:00:00Z",
                "estimatedDeliveryTime": "2026-11-25T12:40:00Z",
                "actualDeliveryTime": delivered,
                "occurredOnUtc": "2026-11-25T12:00:00Z",
            },
            "OrderStatusChanged",
            {
                "orderId": str(ORDER),
                "restaurantId": str(R),
                "orderNumber": "1001",
                "newStatus": _status,
                "lastUpdateTimestamp": "2026-11-25T12:00:00Z",
                "estimatedDeliveryTime": "2026-11-25T12:40:00Z",
                "actualDeliveryTime": delivered,
                "occurredOnUtc": "2026-11-25T12:00:00Z",
                "eventType": _type,
            },
        )
    )


@pytest.mark.parametrize("keys", ["camel", "pascal"])
@pytest.mark.parametrize(
    ("event_type", "given", "sse", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_phase1_events_round_trip_to_the_contract(
    keys: str, event_type: str, given: dict[str, Any], sse: str, expected: dict[str, Any]
) -> None:
    payload = {**given, **PII}
    if keys == "pascal":
        payload = pascal(payload)
    result = render(envelope(event_type, payload))
    assert result.sse_event == sse
    assert result.data == {**expected, **COMMON}
    assert result.channels == (f"restaurant:{R}", f"order:{R}:{ORDER}", f"customer:{C}")
    assert kitchen_of(result.channels[1]) == result.channels[0]  # replays from memory rely on it
    assert sorted(result.dropped_fields) == sorted(pascal(PII) if keys == "pascal" else PII)
    for leaked in ("customerName", "deliveryAddress", "phone"):
        assert leaked not in result.data


def test_every_phase1_type_is_registered() -> None:
    phase1 = {c[0] for c in CASES}
    assert phase1 <= known_event_types()
    assert {"CouponUsed", "RevenueRecorded", "PlatformFeeRecorded"} <= known_event_types()
    assert all(spec.schema_version == 1 for spec in REGISTRY.values())


def _status_payload(**changes: Any) -> dict[str, Any]:
    base = dict(CASES[3][1])  # OrderPreparing
    base.update(changes)
    return base


def test_wrong_new_status_is_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidPayload, match="newStatus") as caught:
        render(envelope("OrderPreparing", _status_payload(newStatus="Delivered")))
    assert caught.value.field == "newStatus"


def test_delivered_requires_actual_delivery_time() -> None:
    payload = dict(CASES[5][1])
    payload["actualDeliveryTime"] = None
    with pytest.raises(InvalidPayload) as caught:
        render(envelope("OrderDelivered", payload))
    assert caught.value.field == "actualDeliveryTime"


def test_actual_delivery_time_must_be_null_before_delivery() -> None:
    with pytest.raises(InvalidPayload) as caught:
        render(
            envelope("OrderPreparing", _status_payload(actualDeliveryTime="2026-11-25T12:30:00Z"))
        )
    assert caught.value.field == "actualDeliveryTime"


def test_a_float_total_is_rejected_because_floats_cannot_carry_money() -> None:
    payload = {**CASES[0][1], "total": 42.5}
    with pytest.raises(InvalidPayload, match="floats") as caught:
        render(envelope("OrderPaymentSucceeded", payload))
    assert caught.value.field == "total"


@pytest.mark.parametrize(
    ("given", "shown"),
    [(Decimal("42.50"), "42.50"), (Decimal("0.10"), "0.10"), (12, "12"), ("19.999", "19.999")],
)
def test_exact_totals_are_broadcast_as_decimal_strings(given: Any, shown: str) -> None:
    result = render(envelope("OrderPaymentSucceeded", {**CASES[0][1], "total": given}))
    assert result.data["total"] == shown


@pytest.mark.parametrize(
    ("given", "shown"), [("1E+2", "100"), (Decimal("1.5E+3"), "1500"), ("1e-2", "0.01")]
)
def test_totals_in_exponent_form_are_broadcast_as_plain_digits(given: Any, shown: str) -> None:
    result = render(envelope("OrderPaymentSucceeded", {**CASES[0][1], "total": given}))
    assert result.data["total"] == shown


@pytest.mark.parametrize(
    "bad", ["NaN", "Infinity", "-1.00", "forty", True, "1e400", "1000000000000000", "0.0000001"]
)
def test_impossible_totals_are_rejected(bad: Any) -> None:
    with pytest.raises(InvalidPayload) as caught:
        render(envelope("OrderPaymentSucceeded", {**CASES[0][1], "total": bad}))
    assert caught.value.field == "total"


def test_an_order_number_longer_than_the_limit_is_rejected() -> None:
    payload = {**CASES[0][1], "orderNumber": "N" * (MAX_ORDER_NUMBER + 1)}
    with pytest.raises(InvalidPayload, match=f"longer than {MAX_ORDER_NUMBER}") as caught:
        render(envelope("OrderPaymentSucceeded", payload))
    assert caught.value.field == "orderNumber"
    assert len(str(caught.value)) < 200


class _Text(str):
    """A string subclass, as a producer's own types may pass one."""


@pytest.mark.parametrize(("given", "shown"), [("B-7", "B-7"), (7, "7"), (_Text("B-8"), "B-8")])
def test_an_order_number_is_broadcast_as_text(given: Any, shown: str) -> None:
    result = render(envelope("OrderPaymentSucceeded", {**CASES[0][1], "orderNumber": given}))
    assert result.data["orderNumber"] == shown
    assert result.order_number == shown


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "must not be empty"),
        (" \t ", "must not be empty"),
        (True, "expected a string or an integer"),
        (7.5, "expected a string or an integer"),
        (" " * (MAX_ORDER_NUMBER + 1), "must not be empty"),
    ],
)
def test_an_order_number_that_says_nothing_is_refused(bad: Any, reason: str) -> None:
    with pytest.raises(InvalidPayload, match=f"orderNumber: {reason}") as caught:
        render(envelope("OrderPaymentSucceeded", {**CASES[0][1], "orderNumber": bad}))
    assert caught.value.field == "orderNumber"


def test_a_payload_time_beyond_year_9999_in_utc_is_a_contract_error() -> None:
    payload = _status_payload(lastUpdateTimestamp="9999-12-31T23:00:00-05:00")
    with pytest.raises(InvalidPayload, match="years 1 to 9999") as caught:
        render(envelope("OrderPreparing", payload))
    assert caught.value.field == "lastUpdateTimestamp"


def test_a_producer_written_delay_alert_is_refused() -> None:
    alert = {
        "orderId": str(ORDER),
        "restaurantId": str(R),
        "kind": "NotAccepted",
        "expectedBy": "2026-11-25T12:03:00Z",
        "detectedAt": "2026-11-25T12:03:01Z",
    }
    with pytest.raises(InvalidPayload, match="derived by the relay only"):
        render(envelope("OrderDelayAlert", alert))


def test_a_null_order_column_routes_to_the_restaurant_only() -> None:
    result = render(envelope("OrderAccepted", CASES[2][1], order_id=None))
    assert result.channels == (f"restaurant:{R}",)


def test_a_huge_unknown_event_type_is_quoted_short() -> None:
    with pytest.raises(UnknownEventType) as caught:
        render(envelope("X" * 1_000_000, {}))
    assert len(str(caught.value)) < 1000


@pytest.mark.parametrize("event_type", ["OrderAccepted", "OrderPaymentSucceeded"])
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"n": ' + "9" * 5000 + "}", "4,?300 digits"),
        ('{"n": ' + "9" * 4301 + "}", "4,?300 digits"),
    ],
)
def test_payloads_python_cannot_hold_are_contract_errors(
    event_type: str, text: str, reason: str
) -> None:
    """Alike whichever decoder the type's payloads go through."""
    event_id, _type, version, restaurant, order, customer = _ids()
    with pytest.raises(InvalidPayload, match=reason):
        render_stored(event_id, event_type, version, restaurant, order, customer, text, WHEN, None)


def test_only_types_that_take_no_number_skip_exact_decimals() -> None:
    for spec in REGISTRY.values():
        takes = spec.event_type in {"OrderPaymentSucceeded", "CouponUsed", "RevenueRecorded",
                                    "PlatformFeeRecorded"}  # fmt: skip
        assert spec.model.takes_numbers() is takes, spec.event_type
        assert (spec.event_type in NUMBERLESS_TYPES) is not takes
    money = decode_payload('{"total": 42.50, "n": 1e2}', "OrderPaymentSucceeded")
    assert money == {"total": Decimal("42.50"), "n": Decimal("1E+2")}
    assert str(money["total"]) == "42.50"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(st.dictionaries(st.text(), _JSON))
def test_a_numberless_type_decodes_what_the_standard_decoder_does(
    payload: dict[str, Any],
) -> None:
    """Its payloads go through pydantic-core's parser: the same values,
    strings, nesting and duplicate keys as ``json.loads`` (numbers as floats)."""
    for text in (json.dumps(payload), json.dumps(payload, ensure_ascii=False)):
        assert decode_payload(text, "OrderAccepted") == json.loads(text)
    doubled = '{"a": 1, "a": 2}'
    assert decode_payload(doubled, "OrderAccepted") == json.loads(doubled)


def test_an_unloadable_occurred_time_is_a_contract_error() -> None:
    with pytest.raises(InvalidPayload, match="-infinity is outside the years") as caught:
        render_stored(*_ids(), "{}", None, "-infinity")
    assert caught.value.field == "occurred_on_utc"


def test_missing_field_is_named() -> None:
    payload = dict(CASES[0][1])
    del payload["orderNumber"]
    with pytest.raises(InvalidPayload, match="orderNumber: required") as caught:
        render(envelope("OrderPaymentSucceeded", payload))
    assert caught.value.field == "orderNumber"


def test_payload_for_another_restaurant_is_refused() -> None:
    with pytest.raises(InvalidPayload) as caught:
        render(envelope("OrderAccepted", CASES[2][1], restaurant_id=uuid.uuid4()))
    assert caught.value.field == "restaurantId"


def test_payload_for_another_order_is_refused() -> None:
    with pytest.raises(InvalidPayload) as caught:
        render(envelope("OrderAccepted", CASES[2][1], order_id=uuid.uuid4()))
    assert caught.value.field == "orderId"


def test_status_event_without_occurred_on_takes_the_rows() -> None:
    payload = dict(CASES[2][1])
    del payload["occurredOnUtc"]
    result = render(envelope("OrderAccepted", payload))
    assert result.data["occurredOnUtc"] == "2026-11-25T12:00:00Z"


def test_naive_timestamps_are_taken_as_utc() -> None:
    payload = _status_payload(lastUpdateTimestamp="2026-11-25T12:00:00")
    assert render(envelope("OrderPreparing", payload)).data["lastUpdateTimestamp"] == (
        "2026-11-25T12:00:00Z"
    )


def test_a_timestamp_a_python_producer_passes_as_a_str_subclass_is_read_as_text() -> None:
    """``OutboxEvent`` payloads come from Python code: a StrEnum or another str
    subclass is still an ISO-8601 string, not a value of the wrong type."""

    class Stamp(StrEnum):
        NOON_IN_PARIS = "2026-11-25T13:00:00+01:00"

    payload = _status_payload(lastUpdateTimestamp=Stamp.NOON_IN_PARIS)
    assert render(envelope("OrderPreparing", payload)).data["lastUpdateTimestamp"] == (
        "2026-11-25T12:00:00Z"
    )


@pytest.mark.parametrize(("event_type", "version"), [("OrderTeleported", 1), ("OrderAccepted", 2)])
def test_unknown_type_or_version(event_type: str, version: int) -> None:
    with pytest.raises(UnknownEventType, match=f"{event_type}.*version {version}"):
        render(envelope(event_type, CASES[2][1], schema_version=version))
    with pytest.raises(UnknownEventType):
        spec_for(event_type, version)


def test_payload_must_be_an_object() -> None:
    with pytest.raises(InvalidPayload, match="JSON object"):
        render(envelope("OrderAccepted", ["not", "an", "object"]))  # type: ignore[arg-type]


def test_coupon_used_goes_to_coupon_and_admin_channels() -> None:
    coupon = uuid.uuid4()
    result = render(
        envelope(
            "CouponUsed",
            {
                "CouponId": str(coupon),
                "PreviousUsageCount": 3,
                "NewUsageCount": 4,
                "UsedAt": "2026-11-25T12:00:00Z",
                "customerEmail": "a@b.c",
            },
        )
    )
    assert result.channels == (f"coupon:{coupon}", "admin")
    assert result.data["newUsageCount"] == 4 and "customerEmail" not in result.data


@pytest.mark.parametrize("event_type", ["RevenueRecorded", "PlatformFeeRecorded"])
def test_finance_events_never_reach_the_kitchen_channel(event_type: str) -> None:
    result = render(
        envelope(
            event_type,
            {
                "restaurantAccountId": str(uuid.uuid4()),
                "restaurantId": str(R),
                "orderId": str(ORDER),
                "amount": "3.20",
                "newBalance": "-10.00",
            },
        )
    )
    assert result.channels == (f"finance:{R}",)
    assert result.data["amount"] == "3.20" and result.data["newBalance"] == "-10.00"
    assert result.sse_event == event_type


def test_delay_alert_routes_to_restaurant_order_and_customer() -> None:
    result = render(
        envelope(
            "OrderDelayAlert",
            {
                "orderId": str(ORDER),
                "restaurantId": str(R),
                "kind": "NotAccepted",
                "expectedBy": "2026-11-25T12:03:00Z",
                "detectedAt": "2026-11-25T12:03:01Z",
            },
            derived=True,
        )
    )
    assert result.channels == (f"restaurant:{R}", f"order:{R}:{ORDER}", f"customer:{C}")
    assert result.sse_event == "OrderDelayAlert"


def test_an_order_event_without_a_customer_goes_to_no_customer_stream() -> None:
    payment = dict(CASES[0][1])
    result = render(envelope("OrderPaymentSucceeded", payment, customer_id=None))
    assert result.channels == (f"restaurant:{R}", f"order:{R}:{ORDER}")


def test_a_null_occurred_on_utc_in_a_status_payload_takes_the_rows_time() -> None:
    given = {**dict(CASES[2][1]), "occurredOnUtc": None}
    row_time = datetime(2026, 11, 25, 12, 7, 30, tzinfo=UTC)
    result = render(envelope(CASES[2][0], given, occurred_on_utc=row_time))
    assert CASES[2][0] == "OrderAccepted"
    assert result.data["occurredOnUtc"] == "2026-11-25T12:07:30Z"
