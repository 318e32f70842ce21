"""Query parameters and headers over real HTTP, fuzzed; and resource bounds under churn.

Whatever a client sends as ``after``, ``limit``, ``Last-Event-ID`` or
``lastEventId``, the relay answers 200 (possibly with a reset) or 400 — never
a 500 — and 1,000 connections that come and go leave no file descriptor and
no memory behind.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.gateway.auth import mint_token
from tests.helpers.db import Databases
from tests.helpers.relay_process import SECRET, RelayProcess

RESTAURANT = uuid.uuid4()
TOKEN = mint_token(SECRET, subject="fuzz", restaurant_ids=[RESTAURANT])
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Cursor-shaped (positions, and the partitioned log's cursors of old) and
# arbitrary text alike (printable ASCII: what a header can carry).
cursorish = st.one_of(
    st.from_regex(r"\Aw-?[0-9]{0,20}(\.[0-9]{0,21}\.-?[0-9]{0,21})?(~[0-9a-f]{0,9})?\Z"),
    st.from_regex(r"\A-?[0-9]{0,3}-[0-9]{0,25}\Z"),
    st.from_regex(r"\Av(\.[0-9]{1,3}-[0-9]{1,20}){0,3}\Z"),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@pytest.fixture(scope="module")
def relay_url(databases: Databases) -> Iterator[str]:
    url = databases.create()
    try:
        with RelayProcess(url, env={"RELAY_HEARTBEAT_SECONDS": "1"}) as relay:
            yield relay.url
    finally:
        databases.drop(url)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(after=cursorish, limit=st.one_of(st.integers(-5, 5000).map(str), st.text(max_size=8)))
@example(after="v", limit="\u00b2")  # a Unicode digit int() refuses: was a 500
def test_polling_parameters_never_500(relay_url: str, after: str, limit: str) -> None:
    response = httpx.get(
        f"{relay_url}/v1/restaurants/{RESTAURANT}/events",
        params={"after": after, "limit": limit},
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "limit" in response.json()["error"]
    else:
        body = response.json()
        assert isinstance(body["events"], list) and isinstance(body["next"], str)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(cursor=cursorish, in_query=st.booleans())
def test_stream_cursors_never_500(relay_url: str, cursor: str, in_query: bool) -> None:
    url = f"{relay_url}/v1/restaurants/{RESTAURANT}/stream"
    headers = dict(AUTH)
    params = {}
    if in_query:
        params["lastEventId"] = cursor
    elif cursor.strip():
        headers["Last-Event-ID"] = cursor.strip()  # a header value has no outer blanks
    with httpx.stream("GET", url, params=params, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        first = next(response.iter_text())
    # Either a resume (an id frame) or a reset, announced before anything else.
    assert first.startswith("retry: ")
    assert "\nid: " in first


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def _churn(port: int, count: int, parallel: int = 100) -> int:
    """Connect, read the first frame, drop: ``count`` times, ``parallel`` at once."""
    request = (
        f"GET /v1/restaurants/{RESTAURANT}/stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    ok = 0

    async def one() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\n\n")
        ok += head.startswith(b"HTTP/1.1 200")
        writer.close()

    for start in range(0, count, parallel):
        await asyncio.gather(*(one() for _ in range(min(parallel, count - start))))
    return ok


async def test_churned_connections_leave_no_descriptors_or_memory(database_url: str) -> None:
    with RelayProcess(database_url, env={"RELAY_HEARTBEAT_SECONDS": "1"}) as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        await _churn(relay.port, 100)  # warm up pools, caches and allocator arenas
        await asyncio.sleep(2)
        fds, rss = _fds(pid), _rss_kb(pid)
        assert await _churn(relay.port, 1000) == 1000
        deadline = asyncio.get_running_loop().time() + 10
        while _fds(pid) > fds + 8 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)  # disconnects are noticed within a heartbeat
        gauge = httpx.get(f"{relay.url}/metrics").text
        assert "relay_subscribers 0.0" in gauge
        # 1,000 leaked sockets would show; the database pool may still grow (≤ 8).
        assert _fds(pid) <= fds + 8, (fds, _fds(pid))
        assert _rss_kb(pid) - rss < 20 * 1024, (rss, _rss_kb(pid))
