"""Deferred events made real: coupons, finance entries, derived delay alerts."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field, model_validator

from relay.events.base import Contract
from relay.events.types import Money, OrderNumber, Utc

__all__ = ["CouponUsed", "FinanceEntry", "OrderDelayAlert"]

_MAX_COUNT = 2**31 - 1  # a usage count, as the order service's int column holds it


class CouponUsed(Contract):
    coupon_id: uuid.UUID
    previous_usage_count: int = Field(ge=0, le=_MAX_COUNT)
    new_usage_count: int = Field(ge=0, le=_MAX_COUNT)
    used_at: Utc

    @model_validator(mode="after")
    def _counts(self) -> CouponUsed:
        if self.new_usage_count < self.previous_usage_count:
            raise ValueError("newUsageCount: must not be below previousUsageCount")
        return self


class FinanceEntry(Contract):
    """RevenueRecorded and PlatformFeeRecorded: finance dashboards only."""

    restaurant_account_id: uuid.UUID
    restaurant_id: uuid.UUID
    order_id: uuid.UUID
    amount: Money
    new_balance: Money


class OrderDelayAlert(Contract):
    """Derived by the relay's SLA timers, never written by the order service."""

    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    order_number: OrderNumber | None = None
    kind: Literal["NotAccepted", "NotReady", "DeliveryLate"]
    expected_by: Utc
    detected_at: Utc
