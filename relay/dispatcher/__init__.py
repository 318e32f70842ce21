"""Claim outbox rows and publish them into the gap-free event log."""

from __future__ import annotations

from relay.dispatcher.batch import BatchResult, LogEvent, claim_and_publish
from relay.dispatcher.partitions import PARTITIONS, partition_of
from relay.dispatcher.runner import Dispatcher, DispatcherConfig

__all__ = [
    "PARTITIONS",
    "BatchResult",
    "Dispatcher",
    "DispatcherConfig",
    "LogEvent",
    "claim_and_publish",
    "partition_of",
]
