"""Phase-1 order events (SPEC §1): what restaurant dashboards receive."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Literal

from pydantic import Field, model_validator

from relay.events.base import Contract
from relay.events.types import Money, OrderNumber, Utc

__all__ = ["OrderPaymentFailed", "OrderPaymentSucceeded", "OrderStatusChanged"]


class OrderPaymentSucceeded(Contract):
    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    order_number: OrderNumber
    status: Literal["Placed", "Paid"]
    total: Money = Field(ge=Decimal(0))
    placement_timestamp: Utc
    last_update_timestamp: Utc
    estimated_delivery_time: Utc | None = None


class OrderPaymentFailed(Contract):
    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    status: Literal["PaymentFailed"]
    failure_timestamp: Utc


Status = Literal["Accepted", "Preparing", "ReadyForDelivery", "Delivered", "Rejected", "Cancelled"]


class OrderStatusChanged(Contract):
    """The uniform DTO of the six status events; ``newStatus`` must match the type."""

    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    order_number: OrderNumber
    new_status: Status
    last_update_timestamp: Utc
    estimated_delivery_time: Utc | None = None
    actual_delivery_time: Utc | None = None
    occurred_on_utc: Utc | None = None  # filled from the outbox row when absent

    @model_validator(mode="after")
    def _delivery_time(self) -> OrderStatusChanged:
        if self.new_status == "Delivered" and self.actual_delivery_time is None:
            raise ValueError("actualDeliveryTime: required when newStatus is Delivered")
        if self.new_status != "Delivered" and self.actual_delivery_time is not None:
            raise ValueError("actualDeliveryTime: must be null unless newStatus is Delivered")
        return self
