"""Issue 11: finance, admin and coupon streams, and the customer's order stream."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.log import Position
from relay.outbox import OutboxEvent, enqueue
from tests.helpers.orders import event
from tests.helpers.relay_process import SECRET, Frame, RelayProcess, parse_frames


@pytest.fixture
def relay(database_url: str) -> Iterator[RelayProcess]:
    with RelayProcess(database_url, env={"RELAY_HEARTBEAT_SECONDS": "1"}) as proc:
        yield proc


def token(
    subject: str = "u", restaurants: list[uuid.UUID] | None = None, roles: list[str] | None = None
) -> str:
    return mint_token(SECRET, subject=subject, restaurant_ids=restaurants or [], roles=roles or [])


def status(url: str, tok: str | None) -> int:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    with httpx.stream("GET", url, headers=headers, timeout=5) as response:
        return response.status_code


class Reader:
    """Reads one SSE stream in a thread, collecting event frames."""

    def __init__(self, url: str, tok: str, last_id: str | None = None) -> None:
        self.frames: list[Frame] = []
        self.last_id = last_id
        self._stop = threading.Event()
        headers = {"Authorization": f"Bearer {tok}"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        self._thread = threading.Thread(target=self._run, args=(url, headers), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(5, read=10)) as r:
                tail = ""
                for text in r.iter_text():
                    frames, _c, tail = parse_frames(tail + text)
                    for frame in frames:
                        if frame.id:
                            self.last_id = frame.id
                        if frame.event:
                            self.frames.append(frame)
                    if self._stop.is_set():
                        return
        except (httpx.HTTPError, OSError):
            return  # the relay went away (test teardown)

    def wait_for(self, count: int, timeout: float = 15) -> list[Frame]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.frames)

    def close(self) -> None:
        self._stop.set()


def coupon_used(restaurant: uuid.UUID, coupon: uuid.UUID, n: int) -> OutboxEvent:
    return OutboxEvent(
        event_type="CouponUsed",
        payload={
            "couponId": str(coupon),
            "previousUsageCount": n,
            "newUsageCount": n + 1,
            "usedAt": "2026-11-25T12:00:00Z",
            "customerEmail": "pii@example.com",
        },
        restaurant_id=restaurant,
    )


def revenue(restaurant: uuid.UUID) -> OutboxEvent:
    order = uuid.uuid4()
    return OutboxEvent(
        event_type="RevenueRecorded",
        payload={
            "restaurantAccountId": str(uuid.uuid4()),
            "restaurantId": str(restaurant),
            "orderId": str(order),
            "amount": "12.30",
            "newBalance": "100.00",
        },
        restaurant_id=restaurant,
        order_id=order,
    )


def produce(url: str, *events: OutboxEvent) -> None:
    with psycopg.connect(url) as conn:
        for item in events:
            enqueue(conn, item)
            conn.commit()


def test_stream_auth_table(relay: RelayProcess) -> None:
    r, other = uuid.uuid4(), uuid.uuid4()
    base = relay.url
    cases: list[tuple[str, str | None, int]] = [
        ("/v1/admin/stream", None, 401),
        ("/v1/admin/stream", token(roles=["finance"]), 403),
        ("/v1/admin/stream", token(roles=["admin"]), 200),
        (f"/v1/coupons/{uuid.uuid4()}/stream", token(roles=["admin"]), 200),
        (f"/v1/coupons/{uuid.uuid4()}/stream", token(restaurants=[r]), 403),
        (f"/v1/restaurants/{r}/finance/stream", token(restaurants=[r], roles=["finance"]), 200),
        (f"/v1/restaurants/{r}/finance/stream", token(restaurants=[other], roles=["finance"]), 403),
        (f"/v1/restaurants/{r}/finance/stream", token(restaurants=[r]), 403),
        (f"/v1/restaurants/{r}/finance/stream", "garbage", 401),
        (f"/v1/restaurants/{r}/stream", token(restaurants=[r], roles=["finance"]), 200),
    ]
    got = [(path, status(base + path, tok)) for path, tok, _ in cases]
    assert got == [(path, code) for path, _, code in cases]


def test_finance_events_never_reach_the_kitchen(relay: RelayProcess, database_url: str) -> None:
    r = uuid.uuid4()
    kitchen = Reader(f"{relay.url}/v1/restaurants/{r}/stream", token(restaurants=[r]))
    finance = Reader(
        f"{relay.url}/v1/restaurants/{r}/finance/stream", token(restaurants=[r], roles=["finance"])
    )
    time.sleep(0.5)
    produce(database_url, revenue(r), event("OrderAccepted", restaurant_id=r), revenue(r))
    assert [f.event for f in finance.wait_for(2)] == ["RevenueRecorded", "RevenueRecorded"]
    time.sleep(0.5)
    assert [f.event for f in kitchen.wait_for(1)] == ["OrderStatusChanged"]
    kitchen.close()
    finance.close()


def test_admin_stream_covers_every_restaurant_and_resumes_exactly(
    relay: RelayProcess, database_url: str
) -> None:
    coupon = uuid.uuid4()
    restaurants = [uuid.uuid4() for _ in range(5)]
    admin = token(roles=["admin"])
    first = Reader(f"{relay.url}/v1/admin/stream", admin)
    coupon_reader = Reader(f"{relay.url}/v1/coupons/{coupon}/stream", admin)
    time.sleep(0.5)
    produce(database_url, *(coupon_used(r, coupon, n) for n, r in enumerate(restaurants)))
    produce(
        database_url, event("OrderAccepted", restaurant_id=restaurants[0])
    )  # not an admin event
    frames = first.wait_for(5)
    assert [f.json()["newUsageCount"] for f in frames] == [1, 2, 3, 4, 5]
    assert all("customerEmail" not in f.data for f in frames)
    assert len(coupon_reader.wait_for(5)) == 5
    first.close()
    coupon_reader.close()
    cursor = first.last_id
    assert cursor is not None and Position.parse(cursor)  # a position in the log
    produce(database_url, *(coupon_used(r, coupon, 10 + n) for n, r in enumerate(restaurants)))
    resumed = Reader(f"{relay.url}/v1/admin/stream", admin, last_id=cursor)
    got = [f.json()["newUsageCount"] for f in resumed.wait_for(5)]
    time.sleep(0.5)
    assert sorted(got) == [11, 12, 13, 14, 15] and len(resumed.frames) == 5
    resumed.close()
    bogus = Reader(f"{relay.url}/v1/admin/stream", admin, last_id="v.9-1")  # a cursor of old
    deadline = time.monotonic() + 5
    while not bogus.frames and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bogus.frames and bogus.frames[0].event == "reset"
    bogus.close()


def test_customer_follows_only_their_order(relay: RelayProcess, database_url: str) -> None:
    r, customer = uuid.uuid4(), uuid.uuid4()
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    produce(
        database_url,
        event("OrderPaymentSucceeded", restaurant_id=r, order_id=mine, customer_id=customer),
    )
    produce(
        database_url,
        event("OrderPaymentSucceeded", restaurant_id=r, order_id=theirs, customer_id=uuid.uuid4()),
    )
    time.sleep(1.0)
    tok = token(subject=str(customer))
    assert status(f"{relay.url}/v1/orders/{theirs}/stream", tok) == 403
    assert status(f"{relay.url}/v1/orders/{uuid.uuid4()}/stream", tok) == 403
    reader = Reader(f"{relay.url}/v1/orders/{mine}/stream", tok, last_id=None)
    time.sleep(0.5)
    for kind in ("OrderAccepted", "OrderPreparing"):
        produce(database_url, event(kind, restaurant_id=r, order_id=mine, customer_id=customer))
        produce(database_url, event(kind, restaurant_id=r, order_id=theirs))
    frames: list[Any] = reader.wait_for(2)
    time.sleep(0.3)
    assert [f.json()["newStatus"] for f in reader.frames] == ["Accepted", "Preparing"]
    assert {f.json()["orderId"] for f in frames} == {str(mine)}
    reader.close()
