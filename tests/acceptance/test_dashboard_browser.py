"""The /dashboard page in real headless Chromium against real `relay run` processes.

Debian's chromium only (``.ci/run`` installs it); never a downloaded browser.
The page is checked through its DOM: which card sits in which column, the
connection indicator, and ``window.relayBoard.stats`` (events applied, and
duplicates the page had to drop, which must stay 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from relay.dispatcher import partition_of
from relay.gateway.auth import mint_token
from relay.outbox import enqueue
from tests.helpers.orders import event, iso
from tests.helpers.relay_process import SECRET, RelayProcess

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).with_name("dashboard.png")
COLUMN = {
    "OrderPaymentSucceeded": "new",
    "OrderAccepted": "accepted",
    "OrderPreparing": "preparing",
    "OrderReadyForDelivery": "ready",
    "OrderDelivered": "delivered",
    "OrderRejected": "stopped",
    "OrderCancelled": "stopped",
    "OrderPaymentFailed": "stopped",
}
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 860})
    try:
        yield context.new_page()
    finally:
        context.close()


@dataclass
class Kitchen:
    """The order service's side: commits events and remembers where each card belongs."""

    url: str
    restaurant: uuid.UUID = field(default_factory=uuid.uuid4)
    columns: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)
    committed: int = 0

    def order(self, number: str, total: str = "24.90") -> uuid.UUID:
        order_id = uuid.uuid4()
        self.numbers[str(order_id)] = number
        self.commit(order_id, "OrderPaymentSucceeded", total=total)
        return order_id

    def commit(self, order_id: uuid.UUID, event_type: str, **kwargs: Any) -> None:
        number = self.numbers.get(str(order_id), "X-1")
        item = event(
            event_type,
            restaurant_id=self.restaurant,
            order_id=order_id,
            order_number=number,
            **kwargs,
        )
        with psycopg.connect(self.url) as conn:
            enqueue(conn, item)
        self.columns[str(order_id)] = COLUMN[event_type]
        self.committed += 1

    def alert(self, order_id: uuid.UUID, kind: str = "NotReady") -> None:
        now = datetime.now(UTC)
        payload = {
            "orderId": str(order_id),
            "restaurantId": str(self.restaurant),
            "orderNumber": self.numbers[str(order_id)],
            "kind": kind,
            "expectedBy": iso(now - timedelta(minutes=2)),
            "detectedAt": iso(now),
        }
        with psycopg.connect(self.url) as conn:
            # As the relay's SLA watcher raises it: a derived row (producers may not).
            conn.execute(
                "INSERT INTO relay_outbox (event_id, event_type, restaurant_id, order_id,"
                " payload, occurred_on_utc, derived)"
                " VALUES (gen_random_uuid(), 'OrderDelayAlert', %s, %s, %s, now(), true)",
                (self.restaurant, order_id, json.dumps(payload)),
            )
        self.committed += 1


def board_url(relay: RelayProcess, restaurant: uuid.UUID, token: str) -> str:
    return f"{relay.url}/dashboard?restaurant={restaurant}&access_token={token}"


def token_for(restaurant: uuid.UUID, ttl: int = 600) -> str:
    return mint_token(SECRET, subject="kitchen-1", restaurant_ids=[restaurant], ttl_seconds=ttl)


def cards(page: Any) -> dict[str, str]:
    found: list[list[str]] = page.evaluate(
        """() => [...document.querySelectorAll('.card')].map(
               (c) => [c.dataset.orderId, c.closest('.column').dataset.column])"""
    )
    assert len(found) == len({order for order, _ in found}), f"a card is duplicated: {found}"
    return dict(found)


def wait_for_board(page: Any, kitchen: Kitchen) -> None:
    """Wait until the DOM holds exactly the expected cards, each in its column."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):  # then show the difference
        page.wait_for_function(
            """(expected) => {
                const cards = [...document.querySelectorAll('.card')];
                return cards.length === Object.keys(expected).length && cards.every(
                    (c) => expected[c.dataset.orderId] === c.closest('.column').dataset.column);
            }""",
            arg=kitchen.columns,
            timeout=TIMEOUT_MS,
        )
    assert cards(page) == kitchen.columns


def wait_for_state(page: Any, *states: str) -> str:
    page.wait_for_function(
        "(states) => states.includes(document.getElementById('connection').dataset.state)",
        arg=list(states),
        timeout=TIMEOUT_MS,
    )
    state: str = page.get_attribute("#connection", "data-state")
    return state


def stats(page: Any) -> dict[str, int]:
    result: dict[str, int] = page.evaluate("() => ({...window.relayBoard.stats})")
    return result


def test_cards_move_live_and_survive_a_relay_crash(
    page: Any, database_url: str, tmp_path: Path
) -> None:
    kitchen = Kitchen(database_url)
    elsewhere = Kitchen(database_url)  # another restaurant: never on this board
    # Before the page opens: the board is built from the polling endpoint.
    margherita = kitchen.order("A-1041", "31.40")
    kitchen.commit(margherita, "OrderAccepted")
    ramen = kitchen.order("A-1042", "13.40")
    failed = uuid.uuid4()
    kitchen.commit(failed, "OrderPaymentFailed")
    elsewhere.order("B-2001")

    first = RelayProcess(database_url).start()
    try:
        page.goto(board_url(first, kitchen.restaurant, token_for(kitchen.restaurant)))
        assert wait_for_state(page, "live") == "live"
        wait_for_board(page, kitchen)
        assert "access_token" not in page.url  # kept out of the address bar and history
        assert page.get_attribute(f'[data-order-id="{failed}"]', "data-status") == "PaymentFailed"

        # Live: each committed event moves its card.
        kitchen.commit(ramen, "OrderAccepted")
        kitchen.commit(margherita, "OrderPreparing")
        burger = kitchen.order("A-1043", "18.20")
        rejected = kitchen.order("A-1044", "9.50")
        kitchen.commit(rejected, "OrderRejected")
        wait_for_board(page, kitchen)
        kitchen.commit(margherita, "OrderReadyForDelivery")
        kitchen.commit(burger, "OrderAccepted")
        kitchen.commit(burger, "OrderPreparing")
        kitchen.alert(burger)
        wait_for_board(page, kitchen)
        page.wait_for_selector(f'[data-order-id="{burger}"] .alert', timeout=TIMEOUT_MS)
        port = first.port
    finally:
        first.kill()  # SIGKILL: no goodbye to the browser

    assert wait_for_state(page, "reconnecting") == "reconnecting"
    # Committed while no relay runs: delivered once the relay is back.
    kitchen.commit(margherita, "OrderDelivered")
    kitchen.commit(ramen, "OrderPreparing")
    kitchen.commit(burger, "OrderReadyForDelivery")
    late = kitchen.order("A-1045", "42.50")
    kitchen.commit(late, "OrderCancelled")
    waiting, salad, wrap = [
        kitchen.order(number, total)
        for number, total in (("A-1046", "27.80"), ("A-1047", "15.60"), ("A-1048", "22.30"))
    ]
    kitchen.commit(uuid.uuid4(), "OrderPaymentFailed")

    with RelayProcess(database_url, port=port) as second:
        wait_for_board(page, kitchen)
        assert wait_for_state(page, "live") == "live"
        seen = stats(page)
        assert seen["duplicates"] == 0
        assert seen["applied"] == kitchen.committed  # every event once, none missing
        # Live again after the catch-up.
        kitchen.commit(ramen, "OrderReadyForDelivery")
        kitchen.commit(salad, "OrderAccepted")
        kitchen.commit(wrap, "OrderAccepted")
        kitchen.commit(wrap, "OrderPreparing")
        kitchen.alert(waiting, "NotAccepted")
        wait_for_board(page, kitchen)
        badge = page.wait_for_selector(f'[data-order-id="{waiting}"] .alert', timeout=TIMEOUT_MS)
        assert badge is not None and "not accepted" in badge.inner_text()
        assert str(elsewhere.restaurant) not in page.content()
        text = page.inner_text("body")
        assert "Ada Lovelace" not in text and "Analytical Engine" not in text  # no PII
        assert "A-1043" in page.inner_text('[data-column="ready"]')
        page.wait_for_function("() => !document.querySelector('.card.fresh')")
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True, animations="disabled")
        assert shot.stat().st_size > 10_000
        if os.environ.get("RELAY_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
            shutil.copyfile(shot, SCREENSHOT)
        assert stats(page)["applied"] == kitchen.committed
        assert second.proc is not None and second.proc.poll() is None


def test_expired_token_recovers_through_the_refresh_hook(browser: Any, database_url: str) -> None:
    kitchen = Kitchen(database_url)
    paid = kitchen.order("C-3001")
    minted: list[int] = []

    def fresh_token() -> str:
        minted.append(1)
        return token_for(kitchen.restaurant, ttl=600)

    with RelayProcess(database_url) as relay:
        context = browser.new_context()
        try:
            renewing = context.new_page()
            renewing.expose_function("mintFreshToken", fresh_token)
            renewing.add_init_script("window.relayRefreshToken = () => window.mintFreshToken();")
            # Expired beyond the server's leeway: the first answer is a 401.
            renewing.goto(board_url(relay, kitchen.restaurant, token_for(kitchen.restaurant, -120)))
            assert wait_for_state(renewing, "live") == "live"
            wait_for_board(renewing, kitchen)
            assert minted and stats(renewing)["renewals"] >= 1
            kitchen.commit(paid, "OrderAccepted")
            wait_for_board(renewing, kitchen)

            # A short-lived token is renewed before it runs out; the stream goes on.
            expiring = context.new_page()
            expiring.expose_function("mintFreshToken", fresh_token)
            expiring.add_init_script("window.relayRefreshToken = () => window.mintFreshToken();")
            expiring.goto(board_url(relay, kitchen.restaurant, token_for(kitchen.restaurant, 3)))
            assert wait_for_state(expiring, "live") == "live"
            expiring.wait_for_function(
                "() => window.relayBoard.stats.renewals >= 1", timeout=TIMEOUT_MS
            )
            kitchen.commit(paid, "OrderPreparing")
            wait_for_board(expiring, kitchen)
            assert wait_for_state(expiring, "live") == "live"
            assert stats(expiring)["duplicates"] == 0

            # Without the hook the page says so instead of retrying forever.
            stale = context.new_page()
            stale.goto(board_url(relay, kitchen.restaurant, token_for(kitchen.restaurant, -120)))
            assert wait_for_state(stale, "expired") == "expired"
            assert "Session expired" in stale.inner_text("#notice")
            assert stale.locator(".card").count() == 0
        finally:
            context.close()


def test_falls_back_to_polling_when_streams_are_refused(page: Any, database_url: str) -> None:
    kitchen = Kitchen(database_url)
    pad_thai = kitchen.order("D-4001")
    token = token_for(kitchen.restaurant)
    # One stream per relay, and this test holds it: the page's EventSource gets 429.
    with (
        RelayProcess(database_url, env={"RELAY_MAX_CONNECTIONS": "1"}) as relay,
        httpx.Client(timeout=10) as client,
        client.stream(
            "GET",
            f"{relay.url}/v1/restaurants/{kitchen.restaurant}/stream",
            headers={"Authorization": f"Bearer {token}"},
        ) as held,
    ):
        assert held.status_code == 200
        page.goto(board_url(relay, kitchen.restaurant, token))
        assert wait_for_state(page, "polling") == "polling"
        wait_for_board(page, kitchen)
        kitchen.commit(pad_thai, "OrderAccepted")
        kitchen.commit(uuid.uuid4(), "OrderPaymentFailed")
        wait_for_board(page, kitchen)
        assert page.evaluate("() => window.relayBoard.mode") == "polling"
        assert stats(page)["applied"] == kitchen.committed
        assert stats(page)["duplicates"] == 0


def test_board_survives_a_reload_and_rebuilds_after_a_reset(page: Any, database_url: str) -> None:
    kitchen = Kitchen(database_url)
    curry = kitchen.order("E-5001")
    kitchen.commit(curry, "OrderAccepted")
    kitchen.commit(kitchen.order("E-5002"), "OrderRejected")
    with RelayProcess(database_url) as relay:
        page.goto(board_url(relay, kitchen.restaurant, token_for(kitchen.restaurant)))
        assert wait_for_state(page, "live") == "live"
        wait_for_board(page, kitchen)
        page.wait_for_function(
            f"() => JSON.parse(sessionStorage.getItem('relay-board:{kitchen.restaurant}') || "
            "'{}').lastId === window.relayBoard.lastId",
            timeout=TIMEOUT_MS,
        )

        # A reload resumes from the saved cursor and state: nothing is replayed.
        page.reload()
        assert wait_for_state(page, "live") == "live"
        assert cards(page) == kitchen.columns
        assert stats(page)["applied"] == 0
        kitchen.commit(curry, "OrderPreparing")
        wait_for_board(page, kitchen)
        after_reload = stats(page)
        assert (after_reload["applied"], after_reload["duplicates"], after_reload["resets"]) == (
            1,
            0,
            0,
        )

        # A cursor the server cannot honour (here: ahead of its log, as after the
        # database was replaced) resets the board, rebuilt from the polling endpoint.
        ghost = {
            "id": str(uuid.uuid4()),
            "number": "GHOST-1",
            "status": "Preparing",
            "firstSeen": iso(datetime.now(UTC)),
        }
        snapshot = {"lastId": f"{partition_of(kitchen.restaurant)}-999999", "orders": [ghost]}
        page.evaluate(
            "([key, value]) => sessionStorage.setItem(key, value)",
            [f"relay-board:{kitchen.restaurant}", json.dumps(snapshot)],
        )
        page.reload()
        wait_for_board(page, kitchen)
        assert "GHOST-1" not in page.inner_text("#board")
        assert stats(page)["resets"] == 1
        assert stats(page)["applied"] == kitchen.committed
        assert wait_for_state(page, "live") == "live"
