"""External publishers: follow the event log from durable offsets into a message bus."""

from __future__ import annotations

import asyncio

from relay.errors import ConfigError
from relay.settings import Settings

__all__ = ["run_publishers"]


async def run_publishers(settings: Settings, stop: asyncio.Event) -> None:
    """Run one publisher per configured URL until ``stop``."""
    raise ConfigError("RELAY_PUBLISHERS is set, but external publishers are not implemented yet")
