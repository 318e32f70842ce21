"""The event log: published events in gap-free positions per partition.

The package owns the log's vocabulary, so the gateway, the publishers and the
SLA follower import the log, never the dispatcher that writes it:

- ``partitions``: restaurants hashed into 64 ordered partitions;
- ``records``: ``LogEvent`` (an event as readers see it), ``BatchResult``;
- ``cursor``: streams, cursors and vector cursors (the SSE ids);
- ``notify``: the ``NOTIFY relay_events`` codec;
- ``reads``: every read of the log (heads, replay, tailing, owners, retention).
"""

from __future__ import annotations

from relay.log import notify
from relay.log.cursor import (
    GLOBAL,
    NIL,
    Cursor,
    Stream,
    customer_scope,
    encode_vector,
    parse_vector,
    restaurant_set_scope,
)
from relay.log.partitions import PARTITIONS, partition_of
from relay.log.reads import (
    heads,
    order_owner,
    prune,
    read_partition,
    replay,
    replay_customer,
    replay_global,
    replay_restaurants,
)
from relay.log.records import BatchResult, LogEvent

__all__ = [
    "GLOBAL",
    "NIL",
    "PARTITIONS",
    "BatchResult",
    "Cursor",
    "LogEvent",
    "Stream",
    "customer_scope",
    "encode_vector",
    "heads",
    "notify",
    "order_owner",
    "parse_vector",
    "partition_of",
    "prune",
    "read_partition",
    "replay",
    "replay_customer",
    "replay_global",
    "replay_restaurants",
    "restaurant_set_scope",
]
