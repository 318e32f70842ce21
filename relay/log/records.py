"""The log's records: an event as readers see it, and a batch as published."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

__all__ = ["BatchResult", "LogEvent"]


class LogEvent(NamedTuple):
    """One published event as readers see it: a position and a pre-encoded object.

    A named tuple: immutable, and cheap to build for every event published or read.
    """

    partition: int
    position: int
    sse_event: str
    channels: tuple[str, ...]
    data: str  # the whitelisted JSON object, encoded once
    event_id: UUID
    event_type: str
    restaurant_id: UUID


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    events: tuple[LogEvent, ...]  # in (partition, position) order
    dead_lettered: int
    dropped_fields: int
    heads: dict[int, tuple[int, int]]  # partition -> (first, last) position published
    enqueued_at: tuple[datetime, ...]  # of the published events, for the lag metric
    seconds: float
    more: bool = False  # the batch hit a limit: more rows are probably pending now
    stale: int = 0  # partitions locked but left alone: published by another replica meanwhile
