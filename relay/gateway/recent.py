"""The events the hub delivered last, kept for replays that start among them.

Dashboards reconnect in storms (a deploy, a relay restart, a network blip),
each resuming a little behind. Replaying from this memory costs neither a
read of the log nor rendering: the events are the ones the hub already fanned
out, validated and encoded once. A replay that starts before the oldest kept
event reads the log as before.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from relay.log import ORIGIN, LogEvent, Position

__all__ = ["Recalled", "Recent", "Remembered"]

# Customer streams ask the log who owns each order, so they never replay
# from memory: their channels are not kept.
_NOT_KEPT = "customer:"


class Recalled(NamedTuple):
    """What a replay needs of an event: its position and its encoded frame parts.

    A third of a ``LogEvent``'s memory: ten thousand of these are kept.
    """

    at: Position
    sse_event: str
    data: str


class Remembered(NamedTuple):
    """A stream's events from memory, and the position they reach: the hub's."""

    events: list[Recalled]
    reached: Position


def _position(event: Recalled) -> Position:
    return event.at


class Recent:
    """Every event in (``start``, ``end``], by channel, at most ``capacity`` events.

    ``end`` follows the hub's delivered position exactly: whatever is above
    it reaches a subscribed stream live, so a replay from memory up to
    ``end`` leaves no gap. Lists per channel (a deque's smallest block is
    ten times a short list's size, and most order channels hold a few
    events); evicted events leave them in batches.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.start = self.end = ORIGIN
        self._kept: deque[Position] = deque()
        self._by_channel: dict[str, list[Recalled]] = {}
        self._evicted = 0

    def __len__(self) -> int:
        return len(self._kept)

    def reset(self, at: Position) -> None:
        """Forget everything: the hub moved to ``at`` without the events between."""
        self._kept.clear()
        self._by_channel.clear()
        self._evicted = 0
        self.start = self.end = at

    def add(self, events: Sequence[LogEvent]) -> None:
        """Events the hub just delivered, in log order, all after ``end``."""
        if not events:
            return
        if not self.capacity:
            self.reset(events[-1].at)
            return
        by_channel = self._by_channel
        for event in events:
            kept = Recalled(event.at, event.sse_event, event.data)
            self._kept.append(event.at)
            for channel in event.channels:
                if channel.startswith(_NOT_KEPT):
                    continue
                found = by_channel.get(channel)
                if found is None:
                    by_channel[channel] = [kept]
                else:
                    found.append(kept)
        self.end = events[-1].at
        self._evict()

    def reach(self, at: Position) -> None:
        """The hub delivered everything up to ``at`` (no events in between)."""
        if at > self.end:
            self.end = at

    def since(self, channels: Sequence[str], after: Position) -> list[Recalled] | None:
        """The events on ``channels`` after ``after`` up to ``end``, in log
        order; None if some may be missing (``after`` is before ``start``)."""
        if not self.capacity or after < self.start or after > self.end:
            return None
        found: list[list[Recalled]] = []
        for channel in channels:
            kept = self._by_channel.get(channel)
            if not kept:
                continue
            first = len(kept)
            while first and kept[first - 1].at > after:
                first -= 1
            if first < len(kept):
                found.append(kept[first:])
        if len(found) <= 1:
            return found[0] if found else []
        merged: list[Recalled] = []
        for event in heapq.merge(*found, key=_position):
            if not merged or merged[-1].at != event.at:  # an event on two of the channels
                merged.append(event)
        return merged

    def _evict(self) -> None:
        kept = self._kept
        excess = len(kept) - self.capacity
        if excess <= 0:
            return
        for _ in range(excess):
            self.start = kept.popleft()
        self._evicted += excess
        if self._evicted >= self.capacity:
            self._compact()

    def _compact(self) -> None:
        """Drop evicted events from the channels' lists (amortised: once per
        ``capacity`` evictions, so memory stays within twice the capacity)."""
        start = self.start
        for channel in list(self._by_channel):
            kept = self._by_channel[channel]
            if kept[-1].at <= start:
                del self._by_channel[channel]
                continue
            first = 0
            while kept[first].at <= start:
                first += 1
            if first:
                del kept[:first]
        self._evicted = 0
