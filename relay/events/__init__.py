"""The event contract (SPEC §1): models per (type, version) and the routing table."""

from __future__ import annotations

from relay.events.registry import (
    REGISTRY,
    Broadcast,
    Envelope,
    EventSpec,
    kitchen_of,
    known_event_types,
    order_channel,
    render,
    spec_for,
    status_of,
)

__all__ = [
    "REGISTRY",
    "Broadcast",
    "Envelope",
    "EventSpec",
    "kitchen_of",
    "known_event_types",
    "order_channel",
    "render",
    "spec_for",
    "status_of",
]
