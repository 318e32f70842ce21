"""From a stored row to an ``Envelope``: what a producer wrote is not yet an event.

The outbox accepts whatever PostgreSQL accepts: infinite timestamps, JSON
nested a thousand levels deep, numbers with ten thousand digits, megabyte
strings. Each of those must become a dead letter with a reason that names
it, never an exception that stops the relay. The claim and the dead-letter
retry read a row's columns alike and hand them to ``envelope_from_row``.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from relay.errors import InvalidPayload, clip
from relay.events.registry import Envelope

__all__ = ["MAX_REASON", "decode_payload", "envelope_from_row"]

# A dead letter's reason is cut to this many characters: a megabyte event
# type must not become a megabyte reason.
MAX_REASON = 500

# Exact numbers: a JSON 42.50 becomes Decimal("42.50"), never a float. One
# decoder for every row: json.loads(..., parse_float=...) would build one per call.
_decode = json.JSONDecoder(parse_float=Decimal).decode


def decode_payload(text: str, event_type: str) -> Any:
    """The payload's JSON as Python values; InvalidPayload for JSON Python cannot hold."""
    try:
        return _decode(text)
    except RecursionError:
        raise InvalidPayload(
            f"{clip(event_type)}: payload: JSON nested too deeply to decode"
        ) from None
    except ValueError as exc:  # e.g. an integer beyond Python's 4,300-digit conversion limit
        raise InvalidPayload(f"{clip(event_type)}: payload: {clip(str(exc), 120)}") from None


def envelope_from_row(
    event_id: str,
    event_type: str,
    schema_version: int,
    restaurant_id: str,
    order_id: str | None,
    customer_id: str | None,
    payload_text: str,
    occurred_on_utc: datetime | None,
    unloadable_time: str | None,
    *,
    derived: bool = False,
) -> Envelope:
    """The row's envelope; InvalidPayload when a column holds no usable value.

    ``occurred_on_utc`` is None exactly when the database held a time outside
    the years 1..9999 in UTC (±infinity included); ``unloadable_time`` is then
    that value as PostgreSQL prints it (the query reads it so, see
    ``relay_loadable_time``).
    """
    if occurred_on_utc is None:
        shown = clip(unloadable_time or "NULL", 40)
        raise InvalidPayload(
            f"{clip(event_type)}: occurred_on_utc: {shown} is outside the years 1 to 9999 "
            "(UTC); write the time the domain event happened",
            field="occurred_on_utc",
        )
    payload = decode_payload(payload_text, event_type)
    # Positional (in Envelope's field order): keywords cost a third more, per event.
    return Envelope(event_id, event_type, schema_version, restaurant_id, order_id,
                    customer_id, occurred_on_utc, payload, derived)  # fmt: skip
