"""The rendering path against the contract's models used the plain way.

``render_row`` validates with the models' core validator, serialises with their
core serialiser and writes the envelope fields itself, for speed. Here a
reference renders the same rows with nothing but pydantic's public API
(``model_validate``, ``model_dump``) and ``json.dumps``: on generated payloads
(every event type, camelCase and PascalCase keys, PII fields, money as
strings and exact JSON numbers, timestamps with offsets and fractions, invalid
values) both must accept the same rows and send byte-identical frames.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from relay.events import REGISTRY, EventSpec
from relay.log import LogEvent, Rejected
from relay.log.rows import render_row

SPECS = sorted(REGISTRY.values(), key=lambda s: s.event_type)
PII = ("customerName", "customerEmail", "deliveryAddress", "customerPhone")
ROW_TIME = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
_MARK = "__exact_number_{}__"


def _aliases(spec: EventSpec) -> list[str]:
    return [info.alias or name for name, info in spec.model.model_fields.items()]


def _pascal(key: str) -> str:
    return key[0].upper() + key[1:]


# --- generated values --------------------------------------------------------

moments = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.none()
)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@st.composite
def timestamps(draw: st.DrawFn) -> Any:
    """ISO-8601 as producers write it (.NET's seven fraction digits, offsets,
    naive, lowercase z), and what is not a timestamp."""
    moment = draw(moments)
    style = draw(st.sampled_from(["Z", "z", "offset", "naive", "seven", "bad", "number", "null"]))
    if style == "offset":
        return moment.replace(tzinfo=draw(offsets)).isoformat()
    if style == "naive":
        return moment.isoformat()
    if style == "seven":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "1Z"
    if style == "bad":
        return draw(st.sampled_from(["yesterday", "", "2026-13-01T00:00:00Z", "12:00"]))
    if style == "number":
        return draw(st.integers(min_value=0, max_value=2**40))
    if style == "null":
        return None
    return moment.isoformat() + style


money = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**16, min_value=-1),
    st.decimals(allow_nan=False, allow_infinity=False, places=7, max_value=10, min_value=0),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**6, min_value=0).map(
        str
    ),
    st.integers(min_value=-10, max_value=10**16),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "ten", "1e3", "NaN"]),
)


def _ids(row_id: uuid.UUID) -> st.SearchStrategy[Any]:
    text = str(row_id)
    return st.sampled_from([text, text, text.upper(), str(uuid.uuid4()), "not-a-uuid", 7])


def _value(spec: EventSpec, key: str, restaurant: uuid.UUID, order: uuid.UUID) -> Any:
    """A strategy for one contract field, chosen by its name: valid or not."""
    if key == "restaurantId":
        return _ids(restaurant)
    if key == "orderId":
        return _ids(order)
    if key.endswith("Id"):
        return _ids(uuid.uuid4())
    if key in ("total", "amount", "newBalance"):
        return money
    if key.endswith(("Timestamp", "Time", "Utc", "At", "By")):
        return timestamps()
    if key == "orderNumber":
        return st.one_of(st.text(max_size=8), st.integers(-5, 10**9), st.text(min_size=99))
    if key in ("status", "newStatus"):
        statuses = ["Placed", "Paid", "PaymentFailed", "Accepted", "Preparing", "Delivered"]
        return st.sampled_from([*statuses, spec.expected_status or "Paid", None])
    if key == "kind":
        return st.sampled_from(["NotAccepted", "NotReady", "DeliveryLate", "Late"])
    if key.endswith("Count"):
        return st.integers(min_value=-2, max_value=2**31 + 2)
    return st.text(max_size=10)


def _valid_value(spec: EventSpec, key: str, restaurant: uuid.UUID, order: uuid.UUID) -> Any:
    """A strategy for one contract field that the contract accepts (mostly: the
    model-level checks, such as usage counts that only grow, and the check
    that the payload's ids are the row's may still fail)."""
    if key in ("restaurantId", "orderId"):
        text = str(restaurant if key == "restaurantId" else order)
        # Now and then another restaurant's or order's id: refused by the routing check.
        return st.sampled_from([text, text, text, text.upper(), f"{{{text}}}", str(uuid.uuid4())])
    if key.endswith("Id"):
        return st.uuids().map(str)
    if key in ("total", "amount", "newBalance"):
        exact = st.decimals(min_value=0, max_value=10**9, places=2)
        return st.one_of(exact, exact.map(str), st.integers(min_value=0, max_value=10**9))
    if key == "actualDeliveryTime" and spec.expected_status != "Delivered":
        return st.none()
    if key.endswith(("Timestamp", "Time", "Utc", "At", "By")):
        return timestamps().filter(lambda t: isinstance(t, str) and t[:1].isdigit())
    if key == "orderNumber":
        return st.one_of(st.integers(0, 10**9), st.text(min_size=1, max_size=12).map("B-".__add__))
    if key == "status":
        return st.sampled_from(
            ["PaymentFailed"] if "Failed" in spec.event_type else ["Placed", "Paid"]
        )
    if key == "newStatus":
        return st.just(spec.expected_status)
    if key == "kind":
        return st.sampled_from(["NotAccepted", "NotReady", "DeliveryLate"])
    if key.endswith("Count"):
        return st.integers(min_value=0, max_value=2**31 - 1)
    return st.text(max_size=10)


@st.composite
def rows(draw: st.DrawFn) -> tuple[EventSpec, tuple[Any, ...]]:
    """An outbox row as the log reads it: ``(window, *COLUMNS)``."""
    spec = draw(st.sampled_from(SPECS))
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    customer = draw(st.sampled_from([None, uuid.uuid4()]))
    valid = draw(st.integers(0, 9)) < 7  # most rows are events; the rest may be anything
    payload: dict[str, Any] = {}
    for key in _aliases(spec):
        if not valid and draw(st.integers(0, 9)) == 0:
            continue  # a field left out
        name = _pascal(key) if draw(st.booleans()) else key
        values = _valid_value if valid else _value
        payload[name] = draw(values(spec, key, restaurant, order))
    for key in draw(st.lists(st.sampled_from(PII), max_size=3, unique=True)):
        payload[key] = draw(st.text(max_size=12))
    occurred = draw(st.sampled_from([ROW_TIME, ROW_TIME.astimezone(timezone(timedelta(hours=5)))]))
    return spec, _row(spec, _json(payload), restaurant, order, customer, occurred)


def _row(
    spec: EventSpec,
    payload: str,
    restaurant: uuid.UUID,
    order: uuid.UUID,
    customer: uuid.UUID | None = None,
    occurred: datetime = ROW_TIME,
) -> tuple[Any, ...]:
    """``(window, *COLUMNS)`` of one outbox row (ids as text, as the log reads them)."""
    return (
        3, 900, 41, str(uuid.uuid4()), spec.event_type, spec.schema_version, str(restaurant),
        str(order), None if customer is None else str(customer), payload, occurred, None,
        spec.derived, ROW_TIME,
    )  # fmt: skip


def _json(payload: dict[str, Any]) -> str:
    """The payload as jsonb::text would give it: exact decimals stay exact numbers."""
    exact: dict[str, str] = {}

    def number(value: Any) -> str:
        if isinstance(value, Decimal):
            exact[_MARK.format(len(exact))] = format(value, "f")
            return _MARK.format(len(exact) - 1)
        raise TypeError(type(value))

    text = json.dumps(payload, default=number)
    for mark, digits in exact.items():
        text = text.replace(f'"{mark}"', digits)
    return text


# PascalCase keys, an integer order number, .NET's seven fraction digits at an
# offset, and a PII field to drop.
PASCAL_AND_PII = _row(
    REGISTRY[("OrderAccepted", 1)],
    json.dumps({
        "OrderId": str(uuid.UUID(int=3)), "restaurantId": str(uuid.UUID(int=2)),
        "orderNumber": 12, "newStatus": "Accepted", "customerName": "Ada",
        "LastUpdateTimestamp": "2026-11-25T14:00:00.1234567+02:00",
    }),
    uuid.UUID(int=2),
    uuid.UUID(int=3),
)  # fmt: skip


# --- the reference: the models, used the plain way ---------------------------


def _utc_text(moment: datetime) -> str:
    text = moment.astimezone(UTC).replace(tzinfo=None).isoformat()
    return text + "Z"


def _reference(spec: EventSpec, row: tuple[Any, ...]) -> tuple[str, tuple[str, ...]] | None:
    """The frame's JSON and channels, or None if the row is not a valid event."""
    _, _, _, event_id, event_type, version, restaurant, order, customer, text, occurred = row[:11]
    payload = json.loads(text, parse_float=Decimal)
    names = {key: key for key in _aliases(spec)} | {_pascal(key): key for key in _aliases(spec)}
    accepted = {names[key]: value for key, value in payload.items() if key in names}
    if spec.expected_status is not None:
        if accepted.get("newStatus") != spec.expected_status:
            return None
        if accepted.get("occurredOnUtc") is None:
            accepted["occurredOnUtc"] = occurred
    try:
        model = spec.model.model_validate(accepted)
    except ValidationError:
        return None
    said = {key: str(value) for key, value in model.model_dump().items()}
    if said.get("restaurant_id", restaurant) != restaurant:
        return None
    if order is not None and said.get("order_id", order) != order:
        return None
    body = model.model_dump(mode="json", by_alias=True)
    body |= {"eventId": event_id, "eventType": event_type, "schemaVersion": version}
    if spec.expected_status is None:
        body["occurredOnUtc"] = _utc_text(occurred)
    frame = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    if event_type == "CouponUsed":
        channels: tuple[str, ...] = (f"coupon:{said['coupon_id']}", "admin")
    elif event_type in ("RevenueRecorded", "PlatformFeeRecorded"):
        channels = (f"finance:{restaurant}",)
    else:
        channels = (f"restaurant:{restaurant}", f"order:{restaurant}:{order}")
        channels += () if customer is None else (f"customer:{customer}",)
    return frame, channels


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
@example((REGISTRY[("OrderAccepted", 1)], PASCAL_AND_PII))
def test_rendered_frames_are_the_models_frames_byte_for_byte(
    case: tuple[EventSpec, tuple[Any, ...]],
) -> None:
    spec, row = case
    expected = _reference(spec, row)
    rendered, dropped = render_row(row)
    event("valid" if expected is not None else "rejected")
    if expected is None:
        assert isinstance(rendered, Rejected), rendered
        return
    assert isinstance(rendered, LogEvent), rendered
    assert (rendered.data, rendered.channels) == expected
    assert rendered.sse_event == spec.sse_event
    # Whitelisted: every payload key that is no contract field is dropped and counted.
    names = set(_aliases(spec)) | {_pascal(key) for key in _aliases(spec)}
    assert dropped == len(set(json.loads(row[9])) - names)
    assert not set(PII) & set(json.loads(rendered.data))
    # The model's facts the SLA timers read are the frame's.
    model = spec.model.model_validate_json(rendered.data)
    assert rendered.order_number == getattr(model, "order_number", None)
    clock = getattr(model, spec.deadline_from) if spec.deadline_from else None
    assert rendered.deadline_from == clock


@settings(max_examples=300, deadline=None)
@given(moment=moments, offset=offsets, seven=st.booleans())
def test_a_timestamp_with_any_offset_is_broadcast_as_the_same_instant_in_utc(
    moment: datetime, offset: timezone, seven: bool
) -> None:
    """Whatever offset and precision the producer wrote, the frame carries that
    instant in UTC with Z (a seventh fraction digit, .NET's, is truncated)."""
    local = moment.replace(tzinfo=offset)
    try:
        instant = local.astimezone(UTC)
    except OverflowError:
        return  # outside the years 1..9999 in UTC: covered by the rejection tests
    written = local.isoformat(timespec="microseconds")
    if seven:
        written = written[:26] + "7" + written[26:]
    spec = REGISTRY[("OrderPaymentFailed", 1)]
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    payload = {"orderId": str(order), "restaurantId": str(restaurant), "status": "PaymentFailed",
               "failureTimestamp": written}  # fmt: skip
    rendered, _ = render_row(_row(spec, json.dumps(payload), restaurant, order))
    assert isinstance(rendered, LogEvent), rendered
    assert json.loads(rendered.data)["failureTimestamp"] == _utc_text(instant)
