"""From a stored row to a ``Broadcast``: what a producer wrote is not yet an event.

The outbox accepts whatever PostgreSQL accepts: infinite timestamps, JSON
nested a thousand levels deep, numbers with ten thousand digits, megabyte
strings. Each of those must become a dead letter with a reason that names
it, never an exception that stops the relay. The log's reads and the
dead-letter retry read a row's columns alike and hand them to ``render_stored``.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic_core import from_json

from relay.errors import InvalidPayload, clip
from relay.events.registry import NUMBERLESS_TYPES, Broadcast, render_fields

__all__ = ["MAX_REASON", "decode_payload", "render_stored"]

# A dead letter's reason is cut to this many characters: a megabyte event
# type must not become a megabyte reason.
MAX_REASON = 500

# Exact numbers: a JSON 42.50 becomes Decimal("42.50"), never a float. One
# decoder for every row: json.loads(..., parse_float=...) would build one per call.
_decode_exact = json.JSONDecoder(parse_float=Decimal).decode


def decode_payload(text: str, event_type: str) -> Any:
    """The payload's JSON as Python values; InvalidPayload for JSON Python cannot hold.

    A type whose contract takes no number is decoded by pydantic-core's
    parser (in Rust, a third of the standard decoder's time on an order
    event): it has no exact decimals, and such a type needs none.
    """
    if event_type in NUMBERLESS_TYPES:
        return _decode_numberless(text, event_type)
    try:
        return _decode_exact(text)
    except RecursionError:
        raise _too_deep(event_type) from None
    except ValueError as exc:  # e.g. an integer beyond Python's 4,300-digit conversion limit
        raise InvalidPayload(f"{clip(event_type)}: payload: {clip(str(exc), 120)}") from None


def _decode_numberless(text: str, event_type: str) -> Any:
    try:
        # Keys only: a payload's keys recur in every event, its values
        # (ids, numbers, times) seldom, and caching those cost a fifth more.
        return from_json(text, cache_strings="keys")
    except ValueError as exc:
        message = str(exc)
        if message.startswith("recursion limit exceeded"):
            raise _too_deep(event_type) from None
        if message.startswith("number out of range"):  # past the 4,300 digits, as above
            message = f"an integer of more than 4,300 digits ({message})"
        raise InvalidPayload(f"{clip(event_type)}: payload: {clip(message, 120)}") from None


def _too_deep(event_type: str) -> InvalidPayload:
    return InvalidPayload(f"{clip(event_type)}: payload: JSON nested too deeply to decode")


def render_stored(
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
) -> Broadcast:
    """The stored row rendered (``render``); InvalidPayload when a column
    holds no usable value.

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
    return render_fields(event_id, event_type, schema_version, restaurant_id, order_id,
                         customer_id, occurred_on_utc, payload, derived)  # fmt: skip
