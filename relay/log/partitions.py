"""Restaurants are hashed into a fixed number of log partitions.

The database computes the same function in ``relay_outbox.partition``
(``get_byte(uuid_send(restaurant_id), 15) & 63``): the last byte of the
restaurant's uuid. A restaurant never changes partition, so its events form
one ordered sequence of positions.
"""

from __future__ import annotations

from uuid import UUID

__all__ = ["PARTITIONS", "partition_of"]

PARTITIONS = 64


def partition_of(restaurant_id: UUID) -> int:
    return restaurant_id.bytes[15] & (PARTITIONS - 1)
