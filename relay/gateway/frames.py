"""Every byte a stream sends, built in one place: SSE's wire format (SPEC §4).

Frames are bytes, encoded once: an event's frame is shared by every
subscriber of its channels, so nothing here is per connection.
"""

from __future__ import annotations

import json
import random

__all__ = [
    "HEARTBEAT",
    "closing",
    "comment",
    "event",
    "opening",
    "reset",
]

# Sent every `heartbeat` seconds by the stream itself (not by a separate ping
# task per connection), also while a database read is slow: proxies keep the
# connection open, a dead client is found by the write, a stuck one by the
# send timeout.
HEARTBEAT = b": heartbeat\n\n"


def event(cursor: str, name: str, data: str) -> bytes:
    """One event: its cursor as the SSE id, its name, its one-line JSON."""
    return f"id: {cursor}\nevent: {name}\ndata: {data}\n\n".encode()


def opening(retry_ms: int, cursor: str) -> bytes:
    """The first frame: the reconnect delay (jittered, so a thousand clients of a
    restarted relay do not return at once) and a cursor before any event."""
    return f"retry: {_jitter(retry_ms, 0.8, 1.2)}\nid: {cursor}\n\n".encode()


def reset(retry_ms: int, reason: str, cursor: str) -> bytes:
    """The first frame of a stream that could not resume (SPEC §4): why, and
    the cursor it starts from instead."""
    data = json.dumps({"reason": reason, "cursor": cursor}, separators=(",", ":"))
    retry = _jitter(retry_ms, 0.8, 1.2)
    return f"retry: {retry}\nid: {cursor}\nevent: reset\ndata: {data}\n\n".encode()


def comment(text: str) -> bytes:
    """A line clients ignore, for people reading the stream (curl, logs)."""
    return f": {text}\n\n".encode()


def closing(retry_ms: int, why: str) -> bytes:
    """The last frame of a stream the relay ends (shutdown, database trouble):
    a longer jittered reconnect delay, so returning clients spread out."""
    retry = _jitter(retry_ms, 1.0, 2.0)
    return f"retry: {retry}\n: {why}; reconnect with Last-Event-ID\n\n".encode()


def _jitter(ms: int, low: float, high: float) -> int:
    return int(ms * random.uniform(low, high))
