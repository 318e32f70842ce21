"""The routing table: event type → model → SSE name → channels. One entry per type.

Adding an event type is one ``EventSpec`` below plus its model. ``render`` is
the only way an outbox row becomes a broadcast: it validates, whitelists and
routes, and refuses a payload whose ids disagree with the row's routing
columns (a mismatch could send one restaurant's event to another).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import ValidationError

from relay.errors import InvalidPayload, UnknownEventType, clip
from relay.events.base import Contract
from relay.events.deferred import CouponUsed, FinanceEntry, OrderDelayAlert
from relay.events.orders import OrderPaymentFailed, OrderPaymentSucceeded, OrderStatusChanged
from relay.events.types import utc_text

__all__ = [
    "NUMBERLESS_TYPES",
    "REGISTRY",
    "Broadcast",
    "Envelope",
    "EventSpec",
    "kitchen_of",
    "known_event_types",
    "order_channel",
    "render",
    "render_fields",
    "spec_for",
]


class Envelope(NamedTuple):
    """One outbox row's routing columns and its decoded payload.

    A named tuple, like the other per-event records: immutable and built in
    half the time of a frozen dataclass (this runs for every event).
    """

    event_id: str  # ids as text, as PostgreSQL and str(UUID) print them
    event_type: str
    schema_version: int
    restaurant_id: str
    order_id: str | None
    customer_id: str | None
    occurred_on_utc: datetime
    payload: Mapping[str, Any]
    derived: bool = False  # written by the relay itself (SLA alerts), not by a producer


class Broadcast(NamedTuple):
    sse_event: str
    json: str  # the broadcast object, encoded once (SSE data and broker body)
    channels: tuple[str, ...]
    dropped_fields: tuple[str, ...]
    # Typed facts of the validated model, for the SLA timers (they read no JSON).
    order_number: str | None
    deadline_from: datetime | None  # the model's ``EventSpec.deadline_from`` field

    @property
    def data(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.json)
        return decoded


# The channels of an event, from its routing columns (restaurant, order,
# customer) and its validated model.
Route = Callable[[str, str | None, str | None, Any], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class EventSpec:
    event_type: str
    schema_version: int
    model: type[Contract]
    sse_event: str
    route: Route
    expected_status: str | None = None  # for the uniform status DTO
    derived: bool = False  # raised by the relay only: refused when a producer writes it
    # The model field an order's SLA deadline counts from, for the types that
    # set (or, for an alert, report) one: ``relay.sla`` reads it per event.
    deadline_from: str | None = None
    # Worked out once per type, for ``render``: the camelCase names, every
    # accepted input name, and the envelope fields every broadcast ends with.
    canonical_keys: frozenset[str] = field(init=False, compare=False, repr=False)
    input_keys: Mapping[str, str] = field(init=False, compare=False, repr=False)
    envelope_tail: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: set once, here
        set_(self, "canonical_keys", self.model.canonical_keys())
        set_(self, "input_keys", self.model.input_keys())
        set_(self, "envelope_tail", f',"eventType":{json.dumps(self.event_type)},'
                                    f'"schemaVersion":{int(self.schema_version)}')  # fmt: skip


@functools.lru_cache(maxsize=65536)
def _channel(kind: str, key: str) -> str:
    return f"{kind}:{key}"  # cached: the same restaurant's channel for each of its events


def order_channel(restaurant_id: uuid.UUID | str, order_id: uuid.UUID | str) -> str:
    """``order:{restaurant}:{order}``: an order's stream is its restaurant's, so a
    row of another restaurant that reuses the order id never reaches it."""
    return f"order:{restaurant_id}:{order_id}"


def kitchen_of(order: str) -> str:
    """The restaurant channel of an order channel: every event routed to the
    order is routed to its restaurant too (``_kitchen_and_order``)."""
    return _channel("restaurant", order.split(":", 2)[1])


def _kitchen_and_order(
    restaurant: str, order: str | None, customer: str | None, _model: Any
) -> tuple[str, ...]:
    kitchen = _channel("restaurant", restaurant)
    if order is None:
        # Routing follows the columns only: a payload's orderId never opens a
        # channel that the order's owner lookup (by column) cannot authorise.
        return (kitchen,)
    if customer is None:
        return (kitchen, order_channel(restaurant, order))
    # The customer's stream of all their orders; the gateway keeps only the
    # events of each order's owner restaurant (see ``order_owner``).
    return (kitchen, order_channel(restaurant, order), _channel("customer", customer))


def _coupon(
    _restaurant: str, _order: str | None, _customer: str | None, model: Any
) -> tuple[str, ...]:
    return (f"coupon:{model.coupon_id}", "admin")


def _finance(
    restaurant: str, _order: str | None, _customer: str | None, _model: Any
) -> tuple[str, ...]:
    return (f"finance:{restaurant}",)


def _status(event_type: str, status: str, deadline_from: str | None = None) -> EventSpec:
    return EventSpec(
        event_type,
        1,
        OrderStatusChanged,
        "OrderStatusChanged",
        _kitchen_and_order,
        expected_status=status,
        deadline_from=deadline_from,
    )


_SPECS = (
    EventSpec(
        "OrderPaymentSucceeded",
        1,
        OrderPaymentSucceeded,
        "OrderPaymentSucceeded",
        _kitchen_and_order,
        deadline_from="last_update_timestamp",
    ),
    EventSpec(
        "OrderPaymentFailed", 1, OrderPaymentFailed, "OrderPaymentFailed", _kitchen_and_order
    ),
    _status("OrderAccepted", "Accepted", "last_update_timestamp"),
    _status("OrderPreparing", "Preparing"),
    _status("OrderReadyForDelivery", "ReadyForDelivery", "estimated_delivery_time"),
    _status("OrderDelivered", "Delivered"),
    _status("OrderRejected", "Rejected"),
    _status("OrderCancelled", "Cancelled"),
    EventSpec("CouponUsed", 1, CouponUsed, "CouponUsed", _coupon),
    EventSpec("RevenueRecorded", 1, FinanceEntry, "RevenueRecorded", _finance),
    EventSpec("PlatformFeeRecorded", 1, FinanceEntry, "PlatformFeeRecorded", _finance),
    EventSpec(
        "OrderDelayAlert",
        1,
        OrderDelayAlert,
        "OrderDelayAlert",
        _kitchen_and_order,
        derived=True,
        deadline_from="expected_by",
    ),
)

REGISTRY: Mapping[tuple[str, int], EventSpec] = {
    (s.event_type, s.schema_version): s for s in _SPECS
}


# Event types none of whose versions takes a number: their payloads may be
# decoded without exact decimals (a number there is refused, or dropped with
# the keys no model knows, whichever way it was decoded).
NUMBERLESS_TYPES = frozenset(s.event_type for s in _SPECS) - frozenset(
    s.event_type for s in _SPECS if s.model.takes_numbers()
)


def status_of() -> dict[str, str]:
    """The status each status-change event type carries (``newStatus``)."""
    return {s.event_type: s.expected_status for s in _SPECS if s.expected_status is not None}


def known_event_types() -> frozenset[str]:
    return frozenset(event_type for event_type, _ in REGISTRY)


def spec_for(event_type: str, schema_version: int) -> EventSpec:
    spec = REGISTRY.get((event_type, schema_version))
    if spec is None:
        raise UnknownEventType(
            f"unknown event type {clip(repr(event_type))} version {schema_version}: "
            f"known types are {', '.join(sorted(known_event_types()))}"
        )
    return spec


def render(envelope: Envelope) -> Broadcast:
    """Validate, whitelist and route one event; raises a ContractError subclass."""
    return render_fields(*envelope)


def render_fields(
    event_id: str,
    event_type: str,
    schema_version: int,
    restaurant_id: str,
    order_id: str | None,
    customer_id: str | None,
    occurred_on_utc: datetime,
    payload: Any,
    derived: bool = False,
) -> Broadcast:
    """``render`` of an envelope's fields, in ``Envelope``'s order: the log's
    reads render every row they read without building an envelope for it."""
    spec = spec_for(event_type, schema_version)
    if spec.derived and not derived:
        raise InvalidPayload(
            f"{spec.event_type}: derived by the relay only (its SLA timers); "
            "the order service must not write it"
        )
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise InvalidPayload(f"{event_type}: payload must be a JSON object")
    # Whitelisting: the model's core validator reads its fields by their
    # camelCase names and ignores every other key, so only PascalCase keys
    # need a renamed copy; dropped keys are just named (and counted).
    accepted: Mapping[str, Any] = payload
    dropped: tuple[str, ...] = ()
    if unknown := payload.keys() - spec.canonical_keys:
        keys = spec.input_keys
        dropped = tuple(sorted([str(key) for key in unknown if key not in keys]))
        if len(dropped) < len(unknown):  # PascalCase keys among them
            accepted = {keys[key]: value for key, value in payload.items() if key in keys}
    if spec.expected_status is not None:
        status = accepted.get("newStatus")
        if status != spec.expected_status:
            raise InvalidPayload(
                f'{event_type}: newStatus: must be "{spec.expected_status}" for '
                f"{event_type}, got {_shown(status)}",
                field="newStatus",
            )
        if accepted.get("occurredOnUtc") is None:  # absent or null: the row's column (SPEC §1)
            accepted = {**accepted, "occurredOnUtc": occurred_on_utc}
    try:
        # The core validator itself: model_validate's Python wrapper costs a
        # tenth of the validation, for every event.
        model = spec.model.__pydantic_validator__.validate_python(accepted)
    except ValidationError as exc:
        raise _invalid(event_type, exc) from None
    # The payload's ids must be the row's. The model's ids are UUIDs (any
    # spelling the producer used, normalised) and the row's are text as
    # PostgreSQL prints a uuid, which str() prints too; a payload that spells
    # an id as the column does (the usual case) needs no formatting.
    if accepted.get("restaurantId") != restaurant_id:
        _check_id(event_type, "restaurantId", getattr(model, "restaurant_id", None), restaurant_id)
    if order_id is not None and accepted.get("orderId") != order_id:
        _check_id(event_type, "orderId", getattr(model, "order_id", None), order_id)
    # Every broadcast object also carries the envelope fields (SPEC §1).
    text = f'{model.broadcast_json()[:-1]},"eventId":"{event_id}"{spec.envelope_tail}'
    if spec.expected_status is None:
        text = f'{text},"occurredOnUtc":"{utc_text(occurred_on_utc)}"}}'
    else:
        text += "}"
    channels = spec.route(restaurant_id, order_id, customer_id, model)
    # Facts, not the model: a model per event kept to the SLA's turn would
    # double the objects each garbage collection walks.
    number = getattr(model, "order_number", None)
    due = getattr(model, spec.deadline_from) if spec.deadline_from is not None else None
    # tuple.__new__: without the named tuple's own (Python) __new__, per event.
    return tuple.__new__(Broadcast, (spec.sse_event, text, channels, dropped, number, due))


def _check_id(event_type: str, name: str, payload_id: Any, row_id: str) -> None:
    """A payload id (a UUID, or None where the model has no such field) must
    be the row's, spelled as PostgreSQL prints it."""
    if payload_id is not None and str(payload_id) != row_id:
        raise InvalidPayload(
            f"{event_type}: {name}: payload says {payload_id}, the outbox row says {row_id}",
            field=name,
        )


def _shown(value: Any) -> str:
    return "nothing" if value is None else f'"{clip(str(value), 64)}"'


def _invalid(event_type: str, exc: ValidationError) -> InvalidPayload:
    first = exc.errors(include_url=False)[0]
    location = [str(part) for part in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    field = location[0] if location else None
    if field is None and ":" in message:  # a model-level check names its field first
        field, message = (part.strip() for part in message.split(":", 1))
    if first["type"] == "missing":
        message = "required"
    where = ".".join(location) if location else field or "payload"
    return InvalidPayload(f"{event_type}: {where}: {message}", field=field)
