"""A network that silently drops the relay's packets: detected, recovered, nothing lost."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.gateway.auth import mint_token
from tests.helpers.proxy import LoopbackProxy
from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames
from tests.reliability.ledger import Ledger, write_orders


def test_blackholed_database_link_is_detected_and_nothing_is_lost(database_url: str) -> None:
    params = conninfo_to_dict(database_url)
    hole = LoopbackProxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    via_hole = database_url.replace(f":{params.get('port', 5432)}/", f":{hole.port}/")
    relay = RelayProcess(
        via_hole, env={"RELAY_QUERY_TIMEOUT": "3s", "RELAY_HEARTBEAT_SECONDS": "1"}
    )
    restaurant = uuid.uuid4()
    received: list[str] = []
    stop = threading.Event()

    def subscribe() -> None:
        token = mint_token(SECRET, subject="s", restaurant_ids=[restaurant])
        cursor = f"{restaurant.bytes[15] & 63}-0"
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
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (0,)
        assert relay.proc is not None and relay.proc.poll() is None  # survived, not crashed
    finally:
        stop.set()
        relay.__exit__()
        hole.close()
