"""The log's records: an event as readers see it, and a page of the log as read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from relay.log.cursor import Position

__all__ = ["LogEvent", "Page", "Rejected"]


class LogEvent(NamedTuple):
    """One valid event as readers see it: its position and its pre-encoded object.

    A named tuple: immutable, and cheap to build for every event read.
    """

    at: Position
    sse_event: str
    channels: tuple[str, ...]
    data: str  # the whitelisted JSON object, encoded once
    event_id: str  # ids as PostgreSQL prints a uuid (as str(UUID) does)
    event_type: str
    schema_version: int
    restaurant_id: str
    order_id: str | None
    customer_id: str | None
    occurred_on_utc: datetime
    enqueued_at: datetime
    # Facts of the validated model (``Broadcast``) for the SLA timers, which
    # read only events rendered in their own process; an event received over
    # the backplane goes to the hub alone and carries none.
    order_number: str | None = None
    deadline_from: datetime | None = None


class Rejected(NamedTuple):
    """A row that is not a valid event: every reader skips it; the recorder's
    check files it as a dead letter, once."""

    at: Position
    row_id: int
    event_id: str
    event_type: str
    schema_version: int
    reason: str


@dataclass(frozen=True, slots=True)
class Page:
    """What one read of the log returned: the valid events and the rejected
    rows after ``after``, in log order, and how far the read reached (every
    row of the selection up to ``reached`` is in this page or an earlier one)."""

    after: Position
    events: list[LogEvent]
    rejected: list[Rejected]
    reached: Position
    rows: int  # rows read, valid or not (a full page means more may follow)
    dropped_fields: int = 0  # payload fields the contract's whitelist dropped
