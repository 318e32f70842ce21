"""Realistic order-service events for tests: payloads as a producer writes them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from relay.events import status_of
from relay.outbox import OutboxEvent

STATUS_OF = status_of()
CHAIN = ["OrderAccepted", "OrderPreparing", "OrderReadyForDelivery", "OrderDelivered"]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payload(
    event_type: str,
    *,
    restaurant_id: uuid.UUID,
    order_id: uuid.UUID,
    order_number: str = "A-1001",
    total: str = "42.50",
    at: datetime | None = None,
    pii: bool = True,
) -> dict[str, Any]:
    """A camelCase payload for ``event_type``; with PII fields the relay must drop."""
    now = at or datetime.now(UTC)
    body: dict[str, Any]
    if event_type == "OrderPaymentSucceeded":
        body = {
            "orderId": str(order_id),
            "restaurantId": str(restaurant_id),
            "orderNumber": order_number,
            "status": "Paid",
            "total": total,
            "placementTimestamp": iso(now - timedelta(minutes=1)),
            "lastUpdateTimestamp": iso(now),
            "estimatedDeliveryTime": iso(now + timedelta(minutes=40)),
        }
    elif event_type == "OrderPaymentFailed":
        body = {
            "orderId": str(order_id),
            "restaurantId": str(restaurant_id),
            "status": "PaymentFailed",
            "failureTimestamp": iso(now),
        }
    else:
        status = STATUS_OF[event_type]
        body = {
            "orderId": str(order_id),
            "restaurantId": str(restaurant_id),
            "orderNumber": order_number,
            "newStatus": status,
            "lastUpdateTimestamp": iso(now),
            "estimatedDeliveryTime": iso(now + timedelta(minutes=30)),
            "actualDeliveryTime": iso(now) if status == "Delivered" else None,
            "occurredOnUtc": iso(now),
        }
    if pii:
        body["customerName"] = "Ada Lovelace"
        body["deliveryAddress"] = "12 Analytical Engine Lane"
    return body


def event(
    event_type: str,
    *,
    restaurant_id: uuid.UUID,
    order_id: uuid.UUID | None = None,
    customer_id: uuid.UUID | None = None,
    **kwargs: Any,
) -> OutboxEvent:
    order = order_id or uuid.uuid4()
    return OutboxEvent(
        event_type=event_type,
        payload=payload(event_type, restaurant_id=restaurant_id, order_id=order, **kwargs),
        restaurant_id=restaurant_id,
        order_id=order,
        customer_id=customer_id,
    )


INSERT_SQL = (
    "INSERT INTO relay_outbox (event_id, event_type, schema_version, restaurant_id, order_id,"
    " customer_id, payload, occurred_on_utc) VALUES (%s, %s, 1, %s, %s, %s, %s, now())"
)
