"""The SLA timers read the facts rendering leaves on each event (its order
number and the time its deadline counts from), never the event's JSON."""

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
        # Alerts close the deadline they report, and only that one.
        _alert(5, other, "NotReady", "2026-11-30T10:03:00Z"),
        _alert(6, other, "NotAccepted", "2026-11-30T10:02:00Z"),
        _alert(7, other, "NotAccepted", "2026-11-30T10:03:00Z"),
    ]  # fmt: skip


def _alert(n: int, order: str, kind: str, expected_by: str) -> LogEvent:
    payload = {"kind": kind, "expectedBy": expected_by, "detectedAt": "2026-11-30T10:03:01Z"}
    return _event(n, "OrderDelayAlert", order, payload)


def _apply(events: list[LogEvent]) -> list[list[tuple[str, Deadline]]]:
    state = OpenDeadlines(Position(0, 0, 0))
    threshold = _Thresholds(SlaConfig(), [])
    steps = []
    for event in events:
        state.apply(event, threshold, timedelta(hours=12))
        steps.append(sorted(state.items()))
    return steps


def test_deadlines_follow_the_models_facts() -> None:
    order, other = str(uuid.uuid4()), str(uuid.uuid4())
    steps = _apply(_history(order, other))
    # Paid: NotAccepted, 3 minutes after lastUpdateTimestamp; the order number
    # (a JSON integer) as text.
    paid = dict(steps[1])
    assert (paid[order].kind, paid[order].due, paid[order].order_number) == (
        "NotAccepted",
        PAID + timedelta(minutes=3),
        "7",
    )
    # Accepted: NotReady, 25 minutes after its lastUpdateTimestamp.
    accepted = dict(steps[2])[order]
    assert (accepted.kind, accepted.due) == ("NotReady", PAID + timedelta(minutes=30))
    # Ready: late after the delivery estimate.
    ready = dict(steps[3])[order]
    assert (ready.kind, ready.due) == ("DeliveryLate", ESTIMATE)
    # An alert of another kind, or for an earlier deadline, leaves it open.
    assert dict(steps[4])[other] == dict(steps[5])[other] == paid[other]
    assert other not in dict(steps[6])
