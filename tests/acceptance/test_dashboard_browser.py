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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from relay.gateway.auth import mint_token
from relay.outbox import enqueue
from tests.helpers.db import unrecorded
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
        snapshot = {"lastId": "w999999", "orders": [ghost]}
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


# ---- several restaurants on one page, one stream ---------------------------------------

# Records every EventSource the page constructs, to count those still open.
COUNT_STREAMS = """
window.__streams = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
    constructor(url, init) { super(url, init); window.__streams.push(this); }
};
"""


def boards_url(relay: RelayProcess, kitchens: list[Kitchen], token: str) -> str:
    listed = "".join(f"restaurant={k.restaurant}&" for k in kitchens)
    return f"{relay.url}/dashboard?{listed}access_token={token}"


def staff_token(*restaurants: uuid.UUID) -> str:
    return mint_token(
        SECRET, subject="manager-1", restaurant_ids=list(restaurants), ttl_seconds=600
    )


def expected(kitchens: list[Kitchen]) -> dict[str, list[str]]:
    """Where each card belongs: [restaurant, column]."""
    return {
        order: [str(k.restaurant), column] for k in kitchens for order, column in k.columns.items()
    }


def board_cards(page: Any) -> dict[str, list[str]]:
    found: list[list[str]] = page.evaluate(
        """() => [...document.querySelectorAll('.card')].map((c) => [
               c.dataset.orderId,
               c.closest('[data-restaurant]').dataset.restaurant,
               c.closest('.column').dataset.column])"""
    )
    assert len(found) == len({order for order, *_ in found}), f"a card is duplicated: {found}"
    return {order: place for order, *place in found}


def wait_for_boards(page: Any, kitchens: list[Kitchen]) -> None:
    """Wait until the DOM holds exactly the expected cards, each in its restaurant's board
    and its column."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    want = expected(kitchens)
    with contextlib.suppress(PlaywrightTimeout):  # then show the difference
        page.wait_for_function(
            """(want) => {
                const cards = [...document.querySelectorAll('.card')];
                return cards.length === Object.keys(want).length && cards.every((c) => {
                    const place = want[c.dataset.orderId];
                    const board = c.closest('[data-restaurant]');
                    return place && board && place[0] === board.dataset.restaurant
                        && place[1] === c.closest('.column').dataset.column;
                });
            }""",
            arg=want,
            timeout=TIMEOUT_MS,
        )
    assert board_cards(page) == want


def open_streams(page: Any) -> list[str]:
    """The URLs of the page's EventSources that are not closed."""
    urls: list[str] = page.evaluate(
        "() => window.__streams.filter((s) => s.readyState !== EventSource.CLOSED)"
        ".map((s) => s.url)"
    )
    return urls


def subscribers(relay: RelayProcess) -> float:
    """The relay's gauge of open SSE streams."""
    for line in httpx.get(f"{relay.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("relay_subscribers "):
            return float(line.split()[1])
    raise AssertionError("no relay_subscribers in /metrics")


def assert_one_stream(page: Any, relay: RelayProcess, kitchens: list[Kitchen]) -> None:
    """The page follows all its restaurants on exactly one stream, seen from both ends."""
    deadline = datetime.now(UTC) + timedelta(milliseconds=TIMEOUT_MS)
    while subscribers(relay) != 1 and datetime.now(UTC) < deadline:
        page.wait_for_timeout(100)  # a replaced stream's close may still be on its way
    assert subscribers(relay) == 1
    [url] = open_streams(page)
    assert url.split("?")[0] == f"{relay.url}/v1/restaurants/stream"
    assert sorted(v for k, v in httpx.URL(url).params.multi_items() if k == "restaurant") == sorted(
        str(k.restaurant) for k in kitchens
    )


def test_several_restaurants_share_one_stream_and_survive_a_relay_crash(
    browser: Any, database_url: str
) -> None:
    """Three restaurants on one page (all in the one log): one board each, one
    EventSource; a fourth restaurant the token also grants, in the same log,
    never shows up; a relay crash is caught up without duplicates."""
    north = Kitchen(database_url)
    south = Kitchen(database_url)
    east = Kitchen(database_url)
    hidden = Kitchen(database_url)
    shown = [north, south, east]
    token = staff_token(*(k.restaurant for k in [*shown, hidden]))
    # Before the page opens: each board is built from its polling endpoint.
    pizza = north.order("N-101", "31.40")
    north.commit(pizza, "OrderAccepted")
    sushi = south.order("S-201", "44.00")
    east.commit(uuid.uuid4(), "OrderPaymentFailed")
    hidden.order("H-901")

    context = browser.new_context(viewport={"width": 1440, "height": 1400})
    try:
        page = context.new_page()
        page.add_init_script(COUNT_STREAMS)
        first = RelayProcess(database_url).start()
        try:
            page.goto(boards_url(first, shown, token))
            assert wait_for_state(page, "live") == "live"
            wait_for_boards(page, shown)
            assert "access_token" not in page.url
            for kitchen in shown:
                label = page.inner_text(f'[data-restaurant="{kitchen.restaurant}"] header')
                assert f"Restaurant {str(kitchen.restaurant)[:8]}" in label
            assert_one_stream(page, first, shown)

            # Live, interleaved across the restaurants (and the hidden one).
            north.commit(pizza, "OrderPreparing")
            hidden.commit(hidden.order("H-902"), "OrderAccepted")
            south.commit(sushi, "OrderAccepted")
            noodles = east.order("E-301", "12.90")
            east.commit(noodles, "OrderAccepted")
            salad = south.order("S-202", "9.80")
            south.commit(salad, "OrderRejected")
            north.commit(pizza, "OrderReadyForDelivery")
            east.alert(noodles)
            hidden.order("H-903")
            wait_for_boards(page, shown)
            page.wait_for_selector(
                f'[data-restaurant="{east.restaurant}"] [data-order-id="{noodles}"] .alert',
                timeout=TIMEOUT_MS,
            )
            seen = stats(page)
            assert seen["duplicates"] == 0
            assert seen["applied"] == sum(k.committed for k in shown)
            assert_one_stream(page, first, shown)
            port = first.port
        finally:
            first.kill()  # SIGKILL: no goodbye to the browser

        assert wait_for_state(page, "reconnecting", "polling") in ("reconnecting", "polling")
        # Committed while no relay runs: delivered once the relay is back.
        north.commit(pizza, "OrderDelivered")
        south.commit(sushi, "OrderPreparing")
        hidden.commit(hidden.order("H-904"), "OrderPreparing")
        east.commit(noodles, "OrderPreparing")
        burger = north.order("N-102", "18.20")
        with RelayProcess(database_url, port=port) as second:
            wait_for_boards(page, shown)
            assert wait_for_state(page, "live") == "live"
            # Live again after the catch-up.
            south.commit(sushi, "OrderReadyForDelivery")
            north.commit(burger, "OrderAccepted")
            hidden.order("H-905")
            east.commit(east.order("E-302"), "OrderCancelled")
            wait_for_boards(page, shown)
            seen = stats(page)
            assert seen["duplicates"] == 0
            assert seen["applied"] == sum(k.committed for k in shown)  # each once, none missing
            assert seen["ignored"] == 0  # the server never sent the hidden restaurant's
            assert_one_stream(page, second, shown)
            assert str(hidden.restaurant) not in page.content()
            text = page.inner_text("body")
            assert "H-9" not in text
            assert "Ada Lovelace" not in text  # no PII
            assert "N-101" in page.inner_text(
                f'[data-restaurant="{north.restaurant}"] [data-column="delivered"]'
            )
            second.kill()

        # Down long enough for the page to poll: the missed events come from the
        # polling endpoint first, then the stream resumes from the page's cursor
        # and replays them too; the page skips them by position, none twice.
        page.wait_for_function("() => window.relayBoard.mode === 'polling'", timeout=TIMEOUT_MS)
        before = stats(page)
        missed = sum(k.committed for k in shown)
        north.commit(burger, "OrderPreparing")
        hidden.order("H-906")
        south.commit(south.order("S-203"), "OrderAccepted")
        east.commit(noodles, "OrderReadyForDelivery")
        missed = sum(k.committed for k in shown) - missed
        with RelayProcess(database_url, ("--dispatcher-only",)):
            wait_for_log(database_url, [*shown, hidden])
        with RelayProcess(database_url, port=port) as third:
            wait_for_boards(page, shown)
            assert wait_for_state(page, "live") == "live"
            north.commit(burger, "OrderReadyForDelivery")
            wait_for_boards(page, shown)
            seen = stats(page)
            assert seen["skipped"] - before["skipped"] == missed
            assert seen["duplicates"] == 0
            assert seen["applied"] == sum(k.committed for k in shown)
            assert_one_stream(page, third, shown)
    finally:
        context.close()


def wait_for_log(url: str, kitchens: list[Kitchen]) -> None:
    """Wait until every event the kitchens committed is in the relay's event
    log (in a recorded window)."""
    deadline = datetime.now(UTC) + timedelta(milliseconds=TIMEOUT_MS)
    restaurants = [k.restaurant for k in kitchens]
    while unrecorded(url, restaurants) and datetime.now(UTC) <= deadline:
        time.sleep(0.1)
    assert unrecorded(url, restaurants) == 0


def test_without_restaurants_the_tokens_grants_are_followed(page: Any, database_url: str) -> None:
    """No ?restaurant=: the boards are the token's restaurant_ids, on one stream;
    a reload resumes from the saved boards without replaying anything."""
    page.add_init_script(COUNT_STREAMS)
    left, right = Kitchen(database_url), Kitchen(database_url)
    kitchens = [left, right]
    stranger = Kitchen(database_url)  # not granted
    tea = left.order("L-1")
    right.commit(right.order("R-1"), "OrderAccepted")
    stranger.order("X-1")
    with RelayProcess(database_url) as relay:
        page.goto(
            f"{relay.url}/dashboard?access_token={staff_token(left.restaurant, right.restaurant)}"
        )
        assert wait_for_state(page, "live") == "live"
        wait_for_boards(page, kitchens)
        assert_one_stream(page, relay, kitchens)
        left.commit(tea, "OrderAccepted")
        right.commit(right.order("R-2"), "OrderPaymentFailed")
        stranger.order("X-2")
        wait_for_boards(page, kitchens)
        page.wait_for_function(
            f"() => JSON.parse(sessionStorage.getItem('relay-board:{right.restaurant}') || "
            "'{}').orders?.length === 2",
            timeout=TIMEOUT_MS,
        )

        page.reload()
        assert wait_for_state(page, "live") == "live"
        assert board_cards(page) == expected(kitchens)
        left.commit(tea, "OrderPreparing")
        wait_for_boards(page, kitchens)
        after_reload = stats(page)
        assert (after_reload["applied"], after_reload["duplicates"], after_reload["resets"]) == (
            1,
            0,
            0,
        )
        assert_one_stream(page, relay, kitchens)
        assert str(stranger.restaurant) not in page.content()
