"""A network that silently drops the relay's packets: detected, recovered, nothing lost."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
from psycopg.conninfo import conninfo_to_dict

from relay.gateway.auth import mint_token
from tests.helpers.db import unrecorded
from tests.helpers.proxy import LoopbackProxy
from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames
from tests.helpers.sse import bulk_accepted, from_start
from tests.reliability.ledger import Ledger, write_orders


def test_blackholed_database_link_is_detected_and_nothing_is_lost(database_url: str) -> None:
    params = conninfo_to_dict(database_url)
    hole = LoopbackProxy(str(params.get("host", "127.0.0.1")), int(params.get("port") or 5432))
    via_hole = database_url.replace(f":{params.get('port', 5432)}/", f":{hole.port}/")
    relay = RelayProcess(
        via_hole, env={"RELAY_QUERY_TIMEOUT": "3s", "RELAY_HEARTBEAT_SECONDS": "1"}
    )
    restaurant = uuid.uuid4()
    received: list[str] = []
    stop = threading.Event()

    def subscribe() -> None:
        token = mint_token(SECRET, subject="s", restaurant_ids=[restaurant])
        cursor = from_start()
        while not stop.is_set():
            try:
                with httpx.stream(
                    "GET", f"{relay.url}/v1/restaurants/{restaurant}/stream",
                    headers={"Authorization": f"Bearer {token}", "Last-Event-ID": cursor},
                    timeout=httpx.Timeout(5, read=3),
                ) as response:  # fmt: skip
                    tail = ""
                    for text in response.iter_text():
                        frames, _c, tail = parse_frames(tail + text)
                        for frame in frames:
                            if frame.event and frame.event != "reset":
                                received.append(json.loads(frame.data)["eventId"])
                            if frame.id:
                                cursor = frame.id
                        if stop.is_set():
                            return
            except (httpx.HTTPError, OSError):
                time.sleep(0.2)

    ledger = Ledger()
    reader = threading.Thread(target=subscribe, daemon=True)
    try:
        relay.start()
        reader.start()
        write_orders(database_url, ledger, [restaurant], 5, seed=1)
        hole.dropping.set()  # the link goes silent: no error, no FIN, nothing
        write_orders(database_url, ledger, [restaurant], 5, seed=2)
        time.sleep(8)
        hole.dropping.clear()
        write_orders(database_url, ledger, [restaurant], 5, seed=3)
        want = {str(e) for e, *_ in ledger.committed}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not want <= set(received):
            time.sleep(0.2)
        assert want <= set(received), f"missing {len(want - set(received))} of {len(want)}"
        assert len(received) == len(set(received))  # and each exactly once
        assert unrecorded(database_url) == 0  # every row is in a recorded window
        assert relay.proc is not None and relay.proc.poll() is None  # survived, not crashed
    finally:
        stop.set()
        relay.__exit__()
        hole.close()


class _Reader:
    """One SSE stream read in a thread: its text so far, and whether it ended."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.text = ""
        self.status = 0
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(5, read=30)) as r:
                self.status = r.status_code
                for chunk in r.iter_text():
                    self.text += chunk
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text and time.monotonic() < deadline:
            time.sleep(0.05)
        return needle in self.text

    def first_id(self, timeout: float) -> str | None:
        """The cursor of the stream's opening frame: where it started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = [f.id for f in parse_frames(self.text)[0] if f.id]
            if ids:
                return ids[0]
            time.sleep(0.05)
        return None

    def numbers(self) -> list[str]:
        return [f.json()["orderNumber"] for f in parse_frames(self.text)[0] if f.event]

    def wait_for_events(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.numbers()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.numbers()) >= count

    def close(self) -> None:
        self._stop.set()


def test_streams_while_the_event_log_is_unreachable(database_url: str) -> None:
    """A fresh or caught-up dashboard joins live without a query; a resume or a poll
    that needs the log ends with a retry hint (no server error); after the outage
    nothing is missed."""
    params = conninfo_to_dict(database_url)
    hole = LoopbackProxy(str(params.get("host", "127.0.0.1")), int(params.get("port") or 5432))
    via_hole = database_url.replace(f":{params.get('port', 5432)}/", f":{hole.port}/")
    relay = RelayProcess(via_hole, env={"RELAY_HEARTBEAT_SECONDS": "1"})
    restaurant = uuid.uuid4()
    token = mint_token(SECRET, subject="s", restaurant_ids=[restaurant])
    url = f"{relay.url}/v1/restaurants/{restaurant}/stream"
    auth = {"Authorization": f"Bearer {token}"}
    readers: list[_Reader] = []
    try:
        relay.start()
        first = _Reader(url, auth)
        readers.append(first)
        assert first.first_id(10) is not None, first.text  # subscribed
        bulk_accepted(database_url, restaurant, 3)
        assert first.wait_for('"orderNumber":"B-3"', 20), first.text
        # A dashboard opened now is caught up: its cursor is the head of the log.
        probe = _Reader(url, auth)
        readers.append(probe)
        head = probe.first_id(10)
        assert head is not None, probe.text
        probe.close()

        hole.cut()  # every database connection of the relay drops; new ones are refused
        fresh = _Reader(url, auth)
        resuming = _Reader(url, {**auth, "Last-Event-ID": from_start()})
        caught_up = _Reader(url, {**auth, "Last-Event-ID": head})
        readers += [fresh, resuming, caught_up]
        for joined in (fresh, caught_up):  # nothing to replay: joined live at the head
            assert joined.wait_for(f"id: {head}\n", 5), joined.text
            assert joined.wait_for(": heartbeat", 5), (fresh.text, relay.output()[-3000:])
        assert resuming.ended.wait(20), resuming.text
        assert resuming.status == 200
        assert "event log unavailable; reconnect with Last-Event-ID" in resuming.text
        assert "retry: " in resuming.text
        assert not fresh.ended.is_set() and not caught_up.ended.is_set()
        # Requests that need the log answer 503 with a retry hint, not a 500.
        polled = httpx.get(
            f"{relay.url}/v1/restaurants/{restaurant}/events", headers=auth, timeout=20
        )
        assert polled.status_code == 503, polled.text
        assert int(polled.headers["Retry-After"]) > 0 and "unavailable" in polled.json()["error"]
        order = httpx.get(f"{relay.url}/v1/orders/{uuid.uuid4()}/stream", headers=auth, timeout=20)
        assert order.status_code == 503, order.text

        hole.restore()
        bulk_accepted(database_url, restaurant, 5)  # B-1..B-5 again as new events
        for joined in (fresh, caught_up):
            assert joined.wait_for_events(5, 30), (joined.text, relay.output()[-4000:])
        time.sleep(0.5)  # a duplicate would arrive now
        for joined in (fresh, caught_up):
            # All of them, once, in order.
            assert joined.numbers() == [f"B-{n}" for n in range(1, 6)]
        assert "Exception in ASGI application" not in relay.output()
    finally:
        for reader in readers:
            reader.close()
        relay.__exit__()
        hole.close()
