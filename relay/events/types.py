"""Field types shared by the event models: UTC timestamps, exact money, ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

__all__ = ["Money", "OrderNumber", "Utc", "utc_text"]


def _utc(value: Any) -> datetime:
    """ISO-8601 with Z or an offset; a naive time is taken as UTC (.NET's Unspecified kind)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError:
            raise ValueError(f"not an ISO-8601 timestamp: {value[:40]!r}") from None
    else:
        raise ValueError("expected an ISO-8601 timestamp string")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _money(value: Any) -> Decimal:
    """Exact decimals only: a binary float cannot carry cents exactly."""
    if isinstance(value, bool):
        raise ValueError("expected a decimal amount")
    if isinstance(value, float):
        raise ValueError(
            "binary floats cannot carry money exactly; send a decimal string such as "
            '"42.50" or a JSON number'
        )
    if isinstance(value, int | Decimal):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {value[:40]!r}") from None
    else:
        raise ValueError("expected a decimal amount")
    if not amount.is_finite():
        raise ValueError("amount must be finite")
    return amount


def _order_number(value: Any) -> str:
    """.NET services often use an int order number: rendered as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a string or an integer")
    text = str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _timestamp_only(value: Any) -> Any:
    """Pydantic would read a number as Unix time; the contract says ISO-8601."""
    if isinstance(value, str | datetime):
        return value
    raise ValueError("expected an ISO-8601 timestamp string")


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # naive: .NET's Unspecified kind, taken as UTC
    # Already at offset zero (pydantic's own zero-offset tzinfo serialises as Z too):
    # kept as is, since this runs for every timestamp of every event.
    return moment if moment.utcoffset() == _ZERO else moment.astimezone(UTC)


_ZERO = timedelta(0)
# Parsed by pydantic's core (fast), then normalised to UTC; serialised with Z.
Utc = Annotated[datetime, BeforeValidator(_timestamp_only), AfterValidator(_as_utc)]
Money = Annotated[Decimal, BeforeValidator(_money)]
OrderNumber = Annotated[str, BeforeValidator(_order_number)]


def utc_text(moment: datetime) -> str:
    """``2026-11-25T10:00:00Z``, with ``.ffffff`` only when there are microseconds."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
