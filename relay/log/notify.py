"""The NOTIFY codec: how a new window announces itself to every relay process.

``NOTIFY relay_windows, '{window}'`` when a window is recorded. It is a hint,
never data: a reader that misses one catches up from the log's head (the
sweep), so a malformed or lost notification costs latency only.
"""

from __future__ import annotations

__all__ = ["CHANNEL", "decode"]

CHANNEL = "relay_windows"


def decode(payload: str) -> int:
    """The window a notification names; ValueError if malformed."""
    if not payload.isascii() or not payload.isdigit() or len(payload) > 18:
        raise ValueError(f"not a window number: {payload[:40]!r}")
    return int(payload)
