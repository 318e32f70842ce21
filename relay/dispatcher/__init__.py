"""Claim outbox rows and publish them into the gap-free event log."""

from __future__ import annotations

from relay.dispatcher.batch import claim_and_publish
from relay.dispatcher.runner import Dispatcher, DispatcherConfig

__all__ = ["Dispatcher", "DispatcherConfig", "claim_and_publish"]
