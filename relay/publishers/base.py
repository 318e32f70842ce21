"""What every broker adapter implements, and the message it is given."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relay.events.schemas import cloudevents_type, dataschema
from relay.log import LogEvent, Position
from relay.publishers.config import CloudEvents

__all__ = [
    "JSON",
    "Broker",
    "Message",
    "Outcome",
    "PermanentRejection",
    "cloudevent_attributes",
    "in_order_per_restaurant",
]

JSON = "application/json"  # every body: the same JSON object SSE clients get


@dataclass(frozen=True, slots=True)
class Message:
    """One log event as a broker message; ``body`` is the same JSON SSE clients get."""

    at: Position  # where the event sits in the log (for logs; brokers never see it)
    event_id: str
    event_type: str
    schema_version: int
    restaurant_id: str
    occurred_on_utc: datetime
    body: bytes

    @classmethod
    def of(cls, event: LogEvent) -> Message:
        return cls(at=event.at, event_id=event.event_id, event_type=event.event_type,
                   schema_version=event.schema_version, restaurant_id=event.restaurant_id,
                   occurred_on_utc=event.occurred_on_utc, body=event.data.encode())  # fmt: skip

    @property
    def occurred_on_text(self) -> str:
        return self.occurred_on_utc.isoformat().replace("+00:00", "Z")


def cloudevent_attributes(message: Message, options: CloudEvents) -> dict[str, str]:
    """The message's CloudEvents 1.0 context attributes as canonical strings; each
    adapter puts them in its protocol binding's headers (binary content mode)."""
    return {
        "specversion": "1.0",
        "id": message.event_id,
        "source": options.source,
        "type": cloudevents_type(message.event_type, message.schema_version, options.type_prefix),
        "subject": message.restaurant_id,
        "time": message.occurred_on_text,
        "dataschema": dataschema(message.event_type, message.schema_version, options.schemas),
        "datacontenttype": JSON,
    }


class PermanentRejection(Exception):
    """The broker (or its limits) refused this message for good: retrying cannot help."""


Outcome = str | None  # None: the broker confirmed it; text: why it was refused for good


class Broker(Protocol):
    """A message bus adapter. Any exception from ``publish`` but a per-message
    rejection is transient: the caller reconnects and republishes the batch."""

    async def connect(self) -> None: ...

    async def publish(self, batch: Sequence[Message]) -> list[Outcome]:
        """Publish in order; return once the broker confirmed (or refused) each one."""
        ...

    async def close(self) -> None: ...


async def in_order_per_restaurant(
    batch: Sequence[Message], send: Callable[[Message], Awaitable[None]]
) -> list[Outcome]:
    """Send each restaurant's messages one after another (each confirmed before the
    next, so the broker keeps their order); different restaurants concurrently."""
    outcomes: list[Outcome] = [None] * len(batch)
    chains: dict[str, list[int]] = {}
    for index, message in enumerate(batch):
        chains.setdefault(message.restaurant_id, []).append(index)

    async def chain(indexes: list[int]) -> None:
        for index in indexes:
            try:
                await send(batch[index])
            except PermanentRejection as exc:
                outcomes[index] = str(exc) or type(exc).__name__

    # Every chain runs to its end (a broken channel fails them all quickly), so
    # no send is still in flight when the caller reconnects and retries.
    results = await asyncio.gather(
        *(chain(indexes) for indexes in chains.values()), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return outcomes
