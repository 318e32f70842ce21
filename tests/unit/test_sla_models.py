"""The SLA timers read each event's validated model: the one its rendering
made, or, for an event that arrives without one, its rendered JSON validated
again. Both must open, move and close the same deadlines."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from relay.log import LogEvent, Position
from relay.log.rows import render_row
from relay.sla import Deadline, OpenDeadlines, SlaConfig, _Thresholds

RESTAURANT = str(uuid.uuid4())
PAID = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
ESTIMATE = PAID + timedelta(minutes=40)


def _event(n: int, event_type: str, order: str, payload: dict[str, Any]) -> LogEvent:
    body = {"orderId": order, "restaurantId": RESTAURANT, **payload}
    row = (1, 100, n, str(uuid.uuid4()), event_type, 1, RESTAURANT, order, None,
           json.dumps(body), PAID, None, event_type == "OrderDelayAlert", PAID)  # fmt: skip
    event, _dropped = render_row(row)
    assert isinstance(event, LogEvent), event
    assert event.contract is not None
    return event


def _status(status: str, **extra: Any) -> dict[str, Any]:
    return {"orderNumber": "B-7", "newStatus": status,
            "lastUpdateTimestamp": "2026-11-30T10:05:00Z", **extra}  # fmt: skip


def _history(order: str, other: str) -> list[LogEvent]:
    paid = {"orderNumber": 7, "status": "Paid", "total": "12.50",
            "placementTimestamp": "2026-11-30T09:59:00+01:00",
            "lastUpdateTimestamp": "2026-11-30T10:00:00Z"}  # fmt: skip
    return [
        _event(1, "OrderPaymentSucceeded", order, paid),
        _event(2, "OrderPaymentSucceeded", other, paid),
        _event(3, "OrderAccepted", order, _status("Accepted")),
        _event(4, "OrderReadyForDelivery", order,
               _status("ReadyForDelivery", estimatedDeliveryTime=ESTIMATE.isoformat())),
        # An alert for the other order's NotAccepted deadline closes it.
        _event(5, "OrderDelayAlert", other,
               {"kind": "NotAccepted", "expectedBy": "2026-11-30T10:03:00Z",
                "detectedAt": "2026-11-30T10:03:01Z"}),
    ]  # fmt: skip


def _apply(events: list[LogEvent]) -> list[list[tuple[str, Deadline]]]:
    state = OpenDeadlines(Position(0, 0, 0))
    threshold = _Thresholds(SlaConfig(), [])
    steps = []
    for event in events:
        state.apply(event, threshold, timedelta(hours=12))
        steps.append(sorted(state.items()))
    return steps


def test_events_without_their_models_move_the_deadlines_alike() -> None:
    order, other = str(uuid.uuid4()), str(uuid.uuid4())
    rendered = _history(order, other)
    bare = [event._replace(contract=None) for event in rendered]
    steps = _apply(rendered)
    assert _apply(bare) == steps
    # What the models said: paid → NotAccepted 3 min after lastUpdateTimestamp,
    # with the order number as text; ready → the delivery estimate.
    first = dict(steps[0])[order]
    assert (first.kind, first.due, first.order_number) == (
        "NotAccepted",
        PAID + timedelta(minutes=3),
        "7",
    )
    final = dict(steps[-1])
    assert (final[order].kind, final[order].due) == ("DeliveryLate", ESTIMATE)
    assert other not in final
