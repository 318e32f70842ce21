"""From an outbox row to what readers see: a ``LogEvent``, or a ``Rejected`` row.

Every reader validates and renders the rows it reads with this one function,
so every replica, publisher and follower gets the same bytes and rejects the
same rows (validation is deterministic: it depends on the row alone).
"""

from __future__ import annotations

import logging
from typing import Any

from relay.errors import ContractError, clip
from relay.events.stored import MAX_REASON, render_stored
from relay.log.cursor import Position
from relay.log.records import LogEvent, Rejected

__all__ = ["COLUMNS", "render_row"]

log = logging.getLogger("relay.log")

# What every read of the log selects from relay_outbox AS o (after the
# window id): a time no client can load (±infinity, year 10000) must not fail
# the read, so it travels as text and the row is rejected. Ids travel as text
# too: every reader prints them (channels, frames, broker headers) and none
# computes with them, so a UUID object per id would be built only to be printed.
# The reads ask for binary results: numbers and times load without parsing
# text (a tenth to a fifth of what loading a row cost).
COLUMNS = b"""o.xid::text::bigint, o.id, o.event_id::text, o.event_type, o.schema_version,
       o.restaurant_id::text, o.order_id::text, o.customer_id::text, o.payload::text,
       CASE WHEN relay_loadable_time(o.occurred_on_utc) THEN o.occurred_on_utc END,
       CASE WHEN NOT relay_loadable_time(o.occurred_on_utc) THEN o.occurred_on_utc::text END,
       o.derived, o.enqueued_at"""


def render_row(row: tuple[Any, ...]) -> tuple[LogEvent | Rejected, int]:
    """``(window, *COLUMNS)`` as an event, or as a rejected row with its reason;
    and how many payload fields the contract's whitelist dropped."""
    (window, xid, row_id, event_id, event_type, version, restaurant, order, customer,
     payload, occurred, unloadable, derived, enqueued) = row  # fmt: skip
    # tuple.__new__ builds a named tuple without its own __new__, a Python
    # function that doubles the cost, here and in the other per-event records.
    at = tuple.__new__(Position, (window, xid, row_id))
    try:
        broadcast = render_stored(event_id, event_type, version, restaurant, order, customer,
                                  payload, occurred, unloadable, derived=derived)  # fmt: skip
    except ContractError as exc:
        reason = clip(str(exc), MAX_REASON)
        return Rejected(at, row_id, event_id, event_type, version, reason), 0
    except Exception as exc:  # a bug must not stop the log: the row is parked for retry
        log.exception("unexpected error validating event %s", event_id)
        reason = f"internal error: {type(exc).__name__}: {clip(str(exc), 200)}"
        return Rejected(at, row_id, event_id, event_type, version, reason), 0
    event = tuple.__new__(LogEvent, (
        at, broadcast.sse_event, broadcast.channels, broadcast.json, event_id, event_type,
        version, restaurant, order, customer, occurred, enqueued, broadcast.order_number,
        broadcast.deadline_from,
    ))  # fmt: skip
    return event, len(broadcast.dropped_fields)
