"""External publishers: follow the event log from durable offsets into a message bus.

``RELAY_PUBLISHERS`` lists broker URLs; each becomes a ``Follower`` that reads
the log's windows from its own offset, independently of SSE (a broker outage
never stalls a dashboard, and one publisher never stalls another).
"""

from __future__ import annotations

import asyncio

from relay.publishers.base import Broker
from relay.publishers.config import PublisherConfig, parse_publishers
from relay.publishers.follower import Follower, PublisherState

__all__ = ["Follower", "PublisherConfig", "PublisherState", "broker_for", "parse_publishers",
           "run_followers"]  # fmt: skip


def broker_for(config: PublisherConfig) -> Broker:
    if config.kind == "amqp":
        from relay.publishers.rabbitmq import RabbitMqBroker

        return RabbitMqBroker(config)
    from relay.publishers.nats import JetStreamBroker

    return JetStreamBroker(config)


async def run_followers(followers: list[Follower], stop: asyncio.Event) -> None:
    """Run every publisher until ``stop``; each retries on its own."""
    await asyncio.gather(*(f.run(stop) for f in followers))
