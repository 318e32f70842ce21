"""The NOTIFY codec: how a publication announces itself to every relay process.

``NOTIFY relay_events, 'partition:first:last,…'`` after each commit. It is a
hint, never data: a reader that misses one catches up from the partition
heads (the sweep), so a malformed or lost notification costs latency only.
"""

from __future__ import annotations

from relay.log.partitions import PARTITIONS

__all__ = ["CHANNEL", "decode", "encode"]

CHANNEL = "relay_events"


def encode(heads: dict[int, tuple[int, int]]) -> str:
    """``partition:first:last,…`` for the positions a batch published."""
    return ",".join(f"{p}:{first}:{last}" for p, (first, last) in heads.items())


def decode(payload: str) -> list[tuple[int, int]]:
    """(partition, last position) per entry; ValueError if malformed."""
    reached = []
    for part in payload.split(","):
        p, _first, last = part.split(":")
        partition, through = int(p), int(last)
        if not 0 <= partition < PARTITIONS:
            raise ValueError(f"partition {partition} out of range")
        reached.append((partition, through))
    return reached
