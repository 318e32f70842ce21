"""The event log: the outbox itself, read in place by transaction-snapshot windows.

The package owns the log's vocabulary, so the recorder, the gateway, the
publishers and the SLA follower import the log and nothing of each other:

- ``cursor``: positions ``(window, xid, id)``, cursors (the SSE ids), streams;
- ``records``: ``LogEvent`` (an event as readers see it), ``Rejected``, ``Page``;
- ``rows``: an outbox row validated and rendered, the same on every replica;
- ``notify``: the ``NOTIFY relay_windows`` codec;
- ``reads``: every read of the log (head, pages, owners, follower offsets).
"""

from __future__ import annotations

from relay.log import notify
from relay.log.cursor import (
    END,
    ORIGIN,
    Position,
    Selector,
    Stream,
    customer_scope,
    restaurant_set_scope,
)
from relay.log.reads import (
    CHECK,
    Head,
    Turn,
    advance_offset,
    head,
    order_owner,
    read,
    read_offset,
    record_window_if_due,
    remember_window,
    take_offset,
    unrecorded_bounds,
)
from relay.log.records import LogEvent, Page, Rejected

__all__ = [
    "CHECK",
    "END",
    "ORIGIN",
    "Head",
    "LogEvent",
    "Page",
    "Position",
    "Rejected",
    "Selector",
    "Stream",
    "Turn",
    "advance_offset",
    "customer_scope",
    "head",
    "notify",
    "order_owner",
    "read",
    "read_offset",
    "record_window_if_due",
    "remember_window",
    "restaurant_set_scope",
    "take_offset",
    "unrecorded_bounds",
]
