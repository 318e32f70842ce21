"""A simulated order service for ``relay demo``: realistic orders through the outbox.

It behaves like a producer should: every event is written with
``relay.outbox.enqueue`` in its own short transaction, on its own connection,
and knows nothing of the relay. Payloads carry PII fields (customer name,
address, phone) as real order services do, so the demo shows the relay
dropping them. One writer and a schedule of due steps keep each order's
events in causal order without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from relay.db import aconnect_retrying
from relay.events import status_of
from relay.outbox import OutboxEvent, enqueue

__all__ = ["Simulator", "SimulatorConfig"]

log = logging.getLogger("relay.simulator")

_MENU = (
    ("Margherita", "9.50"),
    ("Pad thai", "12.90"),
    ("Falafel wrap", "7.80"),
    ("Ramen", "13.40"),
    ("Caesar salad", "8.90"),
    ("Burger", "11.50"),
    ("Fries", "3.90"),
    ("Lemonade", "2.80"),
    ("Tiramisu", "5.20"),
)
_NAMES = (
    "Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
    "Donald Knuth", "Frances Allen", "Ken Thompson", "Radia Perlman", "John Backus",
)  # fmt: skip
_STREETS = (
    "Analytical Engine Lane", "Enigma Road", "Compiler Court", "Semaphore Street",
    "Lambda Avenue", "Kernel Close", "Spanning Tree Way",
)  # fmt: skip

_STATUS = status_of()
# Seconds before each step (low, high): a compressed kitchen day.
_DELAY = {
    "OrderAccepted": (1.0, 4.0),
    "OrderPreparing": (1.0, 3.0),
    "OrderReadyForDelivery": (4.0, 10.0),
    "OrderDelivered": (5.0, 12.0),
    "OrderRejected": (1.0, 3.0),
    "OrderCancelled": (1.0, 4.0),
}
_FULL = ("OrderPaymentSucceeded", "OrderAccepted", "OrderPreparing",
         "OrderReadyForDelivery", "OrderDelivered")  # fmt: skip
_EVENTS_PER_ORDER = 4.3  # the mix below: 10% one event, ~12% two or three, the rest five


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SimulatorConfig:
    restaurants: tuple[uuid.UUID, ...]
    rate: float = 2.0  # events per second, all restaurants together
    pace: float = 1.0  # multiplies every delay between an order's steps
    seed: int | None = None


@dataclass
class _Order:
    order_id: uuid.UUID
    restaurant_id: uuid.UUID
    number: str
    total: str
    customer_id: uuid.UUID
    placed_at: datetime
    eta: datetime
    steps: list[str]  # event types still to write, in order
    pii: dict[str, str] = field(default_factory=dict)
    pending: OutboxEvent | None = None  # kept across a retry: same event_id, no duplicate


class Simulator:
    """Writes orders until stopped; ``written`` counts committed events."""

    def __init__(self, database_url: str, config: SimulatorConfig) -> None:
        if not config.restaurants:
            raise ValueError("the simulator needs at least one restaurant")
        if config.rate <= 0:
            raise ValueError("rate must be positive")
        self._url = database_url
        self._config = config
        self._random = random.Random(config.seed)
        self._numbers = {r: 1000 + self._random.randrange(9000) for r in config.restaurants}
        self._prefix = {r: string.ascii_uppercase[i % 26] for i, r in enumerate(config.restaurants)}
        self._customers = [uuid.uuid4() for _ in range(40)]
        self.written = 0
        self.orders = 0

    # -- what happens to an order ---------------------------------------------

    def _plan(self) -> list[str]:
        roll = self._random.random()
        if roll < 0.10:
            return ["OrderPaymentFailed"]
        if roll < 0.16:
            return ["OrderPaymentSucceeded", "OrderRejected"]
        if roll < 0.22:
            return ["OrderPaymentSucceeded", "OrderAccepted", "OrderCancelled"]
        return [*_FULL]

    def _new_order(self) -> _Order:
        restaurant = self._random.choice(self._config.restaurants)
        self._numbers[restaurant] += 1
        items = self._random.choices(_MENU, k=self._random.randint(1, 4))
        total = sum((Decimal(price) for _name, price in items), Decimal("2.50"))  # + delivery
        now = datetime.now(UTC)
        self.orders += 1
        return _Order(
            order_id=uuid.uuid4(),
            restaurant_id=restaurant,
            number=f"{self._prefix[restaurant]}-{self._numbers[restaurant]}",
            total=str(total.quantize(Decimal("0.01"))),
            customer_id=self._random.choice(self._customers),
            placed_at=now,
            eta=now + timedelta(minutes=self._random.randint(25, 50)),
            steps=self._plan(),
            pii={
                "customerName": self._random.choice(_NAMES),
                "deliveryAddress": f"{self._random.randint(1, 99)} {self._random.choice(_STREETS)}",
                "customerPhone": f"+44 20 7946 {self._random.randint(0, 9999):04d}",
            },
        )

    def _event(self, order: _Order, event_type: str) -> OutboxEvent:
        now = datetime.now(UTC)
        base: dict[str, Any] = {
            "orderId": str(order.order_id),
            "restaurantId": str(order.restaurant_id),
        }
        if event_type == "OrderPaymentFailed":
            body = {**base, "status": "PaymentFailed", "failureTimestamp": _iso(now)}
        elif event_type == "OrderPaymentSucceeded":
            body = {
                **base,
                "orderNumber": order.number,
                "status": "Paid",
                "total": order.total,
                "placementTimestamp": _iso(order.placed_at),
                "lastUpdateTimestamp": _iso(now),
                "estimatedDeliveryTime": _iso(order.eta),
            }
        else:
            status = _STATUS[event_type]
            body = {
                **base,
                "orderNumber": order.number,
                "newStatus": status,
                "lastUpdateTimestamp": _iso(now),
                "estimatedDeliveryTime": _iso(order.eta),
                "actualDeliveryTime": _iso(now) if status == "Delivered" else None,
                "occurredOnUtc": _iso(now),
            }
        return OutboxEvent(
            event_type=event_type,
            payload={**body, **order.pii},  # PII the relay must drop
            restaurant_id=order.restaurant_id,
            order_id=order.order_id,
            customer_id=order.customer_id,
            occurred_on_utc=now,
        )

    def _delay(self, event_type: str) -> float:
        low, high = _DELAY.get(event_type, (0.0, 0.0))
        return self._random.uniform(low, high) * self._config.pace

    # -- the writer -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Write due steps until ``stop``; a lost connection is retried, never fatal."""
        due: list[tuple[float, int, _Order]] = []
        seq = itertools.count()
        order_every = _EVENTS_PER_ORDER / self._config.rate
        next_order = time.monotonic()
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while not stop.is_set():
                wake = min(next_order, due[0][0]) if due else next_order
                pause = wake - time.monotonic()
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                    continue
                if due and due[0][0] <= next_order:
                    _at, _n, order = heapq.heappop(due)
                else:
                    order = self._new_order()
                    next_order += self._random.expovariate(1 / order_every)
                    next_order = max(next_order, time.monotonic() - 1)  # no burst after a stall
                if conn is None or conn.closed:
                    conn = await aconnect_retrying(
                        self._url, stop, label="simulator", logger=log, autocommit=True
                    )
                    if conn is None:
                        return
                if order.pending is None:
                    order.pending = self._event(order, order.steps[0])
                try:
                    async with conn.transaction():
                        await enqueue(conn, order.pending)
                except psycopg.OperationalError as exc:
                    log.warning("simulator: write failed (%s); retrying", type(exc).__name__)
                    await conn.close()
                    heapq.heappush(due, (time.monotonic() + 0.5, next(seq), order))
                    continue
                self.written += 1
                order.pending = None
                order.steps.pop(0)
                if order.steps:
                    at = time.monotonic() + self._delay(order.steps[0])
                    heapq.heappush(due, (at, next(seq), order))
        finally:
            if conn is not None:
                await conn.close()
