"""The hub's fan-in subscriber: one buffer for a stream over several channels."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from relay.gateway.hub import Hub
from relay.log import LogEvent, Position
from tests.helpers.orders import event


def test_a_fan_in_subscriber_has_one_buffer_and_leaves_no_trace() -> None:
    """One subscriber for several channels: one bounded buffer for the stream
    as a whole (overflow closes it), each channel's events offered to it, and
    unsubscribing restores every count the hub keeps."""
    hub = Hub("postgresql://unused")
    r1, r2 = uuid.uuid4(), uuid.uuid4()
    channels = [f"restaurant:{r}" for r in (r1, r2)]
    single = hub.subscribe(channels[0], limit=10)
    many = hub.subscribe_many(channels + channels[:1], limit=3)  # a repeat counts once
    assert hub.subscriber_count == 2
    assert many.routes() == tuple(channels)
    ids = iter(range(1, 100))

    def offer(restaurant: uuid.UUID) -> None:
        item = event("OrderAccepted", restaurant_id=restaurant)
        now = datetime.now(UTC)
        hub._deliver([LogEvent(
            at=Position(1, 700, next(ids)), sse_event="OrderStatusChanged",
            channels=(f"restaurant:{restaurant}",), data="{}", event_id=str(item.event_id),
            event_type=item.event_type, schema_version=1, restaurant_id=str(restaurant),
            order_id=str(item.order_id), customer_id=None, occurred_on_utc=now, enqueued_at=now,
        )])  # fmt: skip

    offer(r1)
    offer(r2)
    assert [e.restaurant_id for e, _ in many.frames] == [str(r1), str(r2)]
    assert len(single.frames) == 1
    offer(r2)
    offer(r1)  # the fourth frame overflows the buffer of three
    assert many.closed == "slow" and many.frames == []
    assert single.closed is None
    hub.unsubscribe(many)
    hub.unsubscribe(many)  # twice is harmless
    hub.unsubscribe(single)
    assert hub.subscriber_count == 0
    assert hub._channels == {}
