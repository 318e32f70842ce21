"""The events the hub delivered last, kept for replays that start among them.

Dashboards reconnect in storms (a deploy, a relay restart, a network blip),
each resuming a little behind. Replaying from this memory costs neither a
read of the log nor rendering: the events are the ones the hub already fanned
out, validated and encoded once. A replay that starts before the oldest kept
event reads the log as before.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

from relay.events import kitchen_of
from relay.log import ORIGIN, LogEvent, Position

__all__ = ["Recalled", "Recent", "Remembered"]

# Customer streams ask the log who owns each order, so they never replay
# from memory: their channels are not kept. An order's events are found in
# its restaurant's list, so order channels get no list of their own.
_NOT_KEPT = "customer:"
_IN_KITCHEN = "order:"
_NOT_LISTED = (_IN_KITCHEN, _NOT_KEPT)


class Recalled(NamedTuple):
    """What a replay needs of an event: its position, its encoded frame parts,
    and its channels (the event's own tuple, shared, for order streams)."""

    at: Position
    sse_event: str
    data: str
    channels: tuple[str, ...]


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
    ``end`` leaves no gap. Lists per shared channel (restaurant, finance,
    coupon, admin); evicted events leave them in batches. An order channel
    is answered from its restaurant's list: a list per order (most hold an
    event or two) cost a third of the hub's time per event to keep.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.start = self.end = ORIGIN
        # Positions in log order; the first ``_gone`` of them are evicted (a
        # list trimmed in batches: no Python loop per evicted event).
        self._kept: list[Position] = []
        self._gone = 0
        self._by_channel: dict[str, list[Recalled]] = {}

    def __len__(self) -> int:
        return len(self._kept) - self._gone

    def reset(self, at: Position) -> None:
        """Forget everything: the hub moved to ``at`` without the events between."""
        self._kept = []
        self._gone = 0
        self._by_channel.clear()
        self.start = self.end = at

    def add(self, events: Sequence[LogEvent]) -> None:
        """Events the hub just delivered, in log order, all after ``end``."""
        if not events:
            return
        if not self.capacity:
            self.reset(events[-1].at)
            return
        by_channel = self._by_channel
        keep = self._kept.append
        for event in events:
            channels = event.channels
            # tuple.__new__: without the named tuple's own (Python) __new__.
            kept = tuple.__new__(Recalled, (event.at, event.sse_event, event.data, channels))
            keep(event.at)
            for channel in channels:
                if channel.startswith(_NOT_LISTED):
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
            order = channel.startswith(_IN_KITCHEN)
            kept = self._by_channel.get(kitchen_of(channel) if order else channel)
            if not kept:
                continue
            first = len(kept)
            while first and kept[first - 1].at > after:
                first -= 1
            if first == len(kept):
                continue
            if order:
                mine = [e for e in kept[first:] if channel in e.channels]
                if mine:
                    found.append(mine)
            else:
                found.append(kept[first:])
        if len(found) <= 1:
            return found[0] if found else []
        merged: list[Recalled] = []
        for event in heapq.merge(*found, key=_position):
            if not merged or merged[-1].at != event.at:  # an event on two of the channels
                merged.append(event)
        return merged

    def _evict(self) -> None:
        excess = len(self) - self.capacity
        if excess <= 0:
            return
        self._gone += excess
        self.start = self._kept[self._gone - 1]
        if self._gone >= self.capacity:
            self._compact()

    def _compact(self) -> None:
        """Drop evicted events from memory (amortised: once per ``capacity``
        evictions, so memory stays within twice the capacity)."""
        del self._kept[: self._gone]
        self._gone = 0
        start = self.start
        for channel in list(self._by_channel):
            kept = self._by_channel[channel]
            if kept[-1].at <= start:
                del self._by_channel[channel]
                continue
            if kept[0].at <= start:
                del kept[: bisect_right(kept, start, key=_position)]
