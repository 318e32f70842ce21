"""Field types shared by the event models: UTC timestamps, exact money, ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

__all__ = ["MAX_ORDER_NUMBER", "Money", "OrderNumber", "Utc", "utc_text"]

# Bounds on what a producer may broadcast: every dashboard of a restaurant
# receives each frame, so one careless megabyte string costs them all.
MAX_ORDER_NUMBER = 100  # characters
MONEY_LIMIT = Decimal(10) ** 15  # amounts are below a quadrillion in absolute value
MONEY_PLACES = 6  # decimal places: enough for any currency's minor unit
_MONEY_STEP = Decimal(1).scaleb(-MONEY_PLACES)


def _utc(value: Any) -> datetime:
    """ISO-8601 with Z or an offset, as a UTC datetime; a naive time is taken as
    UTC (.NET's Unspecified kind). Pydantic would read a number as Unix time; the
    contract says ISO-8601, so numbers are refused."""
    # This runs for every timestamp of every event: the usual spelling (with
    # Z, parsed to the UTC singleton) takes the shortest way through.
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = _lower_z(value)
    elif isinstance(value, datetime):
        moment = value
    else:
        raise ValueError("expected an ISO-8601 timestamp string")
    zone = moment.tzinfo
    if zone is UTC:
        return moment
    if zone is None:
        return moment.replace(tzinfo=UTC)
    if moment.utcoffset() == _ZERO:  # already at offset zero: kept as is
        return moment
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is in year 10000 in UTC
        raise ValueError("outside the years 1 to 9999 in UTC") from None


def _lower_z(value: str) -> datetime:
    """A timestamp ending in a lower-case z, which ``fromisoformat`` refuses."""
    try:
        return datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value[:40]!r}") from None


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
    if abs(amount) >= MONEY_LIMIT:
        raise ValueError("amount must be below 10^15 in absolute value")
    if amount != amount.quantize(_MONEY_STEP, rounding="ROUND_DOWN"):
        raise ValueError(f"amount has more than {MONEY_PLACES} decimal places")
    return amount


def _plain_decimal(amount: Decimal) -> str:
    """``"1000.50"``, never ``"1.0005E+3"``: consumers parse money as plain digits."""
    return format(amount, "f")


def _order_number(value: Any) -> str:
    """.NET services often use an int order number: rendered as its decimal string."""
    if type(value) is str:  # the usual case first: this runs for every event
        text = value
    elif isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
    else:
        raise ValueError("expected a string or an integer")
    if not text or text.isspace():
        raise ValueError("must not be empty")
    if len(text) > MAX_ORDER_NUMBER:
        raise ValueError(f"longer than {MAX_ORDER_NUMBER} characters ({len(text)})")
    return text


_ZERO = timedelta(0)
# Parsed and normalised to UTC in one Python call (``datetime.fromisoformat`` is
# C) before pydantic's core takes the datetime as it is; a before validator
# keeps the core's own serialiser (with Z), which a plain one would wrap in
# Python. This runs for every timestamp of every event.
Utc = Annotated[datetime, BeforeValidator(_utc)]
Money = Annotated[
    Decimal, BeforeValidator(_money), PlainSerializer(_plain_decimal, return_type=str)
]
OrderNumber = Annotated[str, BeforeValidator(_order_number)]


def utc_text(moment: datetime) -> str:
    """``2026-11-25T10:00:00Z``, with ``.ffffff`` only when there are microseconds
    (isoformat, not strftime: glibc does not zero-pad years below 1000)."""
    moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds") + "Z"
