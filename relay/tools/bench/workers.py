"""Bench client processes: SSE subscribers and outbox writers.

They run as separate processes (``python -m relay.tools.bench.workers MODE``, the
spec as one JSON line on stdin) so clients never share the relay's core
budget or its GIL. Each prints
``ready`` once set up, then one JSON line with its results. Clocks are
``time.monotonic()``: system-wide on Linux, so comparable across processes.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

_EVENT = b"\nevent: "
_ID = b"\nid: "
_HEARTBEAT = b": heartbeat"
_NUMBER = re.compile(rb'"orderNumber":"[A-Z]-(\d+)"')

WRITE_SQL = (
    "INSERT INTO {table} (event_id, event_type, schema_version, restaurant_id, order_id, payload,"
    " occurred_on_utc) VALUES (%s, 'OrderAccepted', 1, %s, %s, %s, now())"
)


def raise_fd_limit() -> None:
    """Soft file-descriptor limit up to the hard one: 10,000 sockets need it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _Stream:
    __slots__ = (
        "cursor", "events", "expect", "heartbeats", "numbers", "ok", "path", "port", "reconnects",
        "token",
    )  # fmt: skip

    def __init__(self, path: str, token: str, cursor: str | None, expect: int, port: int) -> None:
        self.path = path
        self.port = port  # each stream may follow another replica (several gateways, one client)
        self.token = token
        self.cursor = cursor  # the id of the last whole frame read: where a reconnect resumes
        self.expect = expect
        self.events = 0
        self.heartbeats = 0
        self.numbers: list[tuple[int, float]] = []
        self.ok = False
        self.reconnects = 0


def _last_id(frames: bytes, end: int | None = None) -> str | None:
    """The cursor of the last frame that carries one, in whole frames (up to ``end``)."""
    at = frames.rfind(_ID, 0, end)
    if at >= 0:
        start = at + len(_ID)
    elif frames.startswith(_ID[1:]):
        start = len(_ID) - 1
    else:
        return None
    return frames[start : frames.index(b"\n", start)].decode()


async def _follow(
    spec: dict[str, Any], state: _Stream, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    """Follow one stream as a browser's EventSource does: when the server ends it
    (a slow reader's overflow, a token's expiry, a restart), reconnect with the
    last cursor, so a scenario measures the relay instead of hanging."""
    while not stop.is_set():
        if await _connection(spec, state, ready, stop) or stop.is_set():
            return
        state.reconnects += 1
        await asyncio.sleep(0.05)


async def _connection(
    spec: dict[str, Any], state: _Stream, ready: asyncio.Event, stop: asyncio.Event
) -> bool:
    """One HTTP connection of a stream; True when it must not be retried (refused)."""
    reader, writer = await asyncio.open_connection(spec["host"], state.port)
    head = f"GET {state.path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {state.token}\r\n"
    if state.cursor:
        head += f"Last-Event-ID: {state.cursor}\r\n"
    writer.write((head + "\r\n").encode())
    record = spec.get("record", False)
    try:
        status = await reader.readuntil(b"\r\n\r\n")
        state.ok = status.startswith(b"HTTP/1.1 200")
        if not state.ok:
            ready.set()
            return True
        # Subscribed once the first cursor arrives (an id-only frame, or replay).
        tail = await reader.readuntil(b"\n\n")
        state.cursor = _last_id(tail) or state.cursor
        ready.set()
        while not stop.is_set():
            data = await reader.read(262144)
            if not data:
                return False
            now = time.monotonic()
            buffer = tail + data
            # Whole frames only: a frame split across reads is counted once, with the next.
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                tail = buffer
                continue
            cut += 2
            state.events += buffer.count(_EVENT, 0, cut)
            state.heartbeats += buffer.count(_HEARTBEAT, 0, cut)
            if record:
                state.numbers += [(int(m), now) for m in _NUMBER.findall(buffer, 0, cut)]
            state.cursor = _last_id(buffer, cut) or state.cursor
            tail = buffer[cut:]
        return True
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    finally:
        writer.close()


async def subscribe(spec: dict[str, Any]) -> dict[str, Any]:
    """Open every stream, say ``ready``, then read until each has its events (or timeout)."""
    raise_fd_limit()
    states = [
        _Stream(
            s["path"],
            s.get("token") or spec["token"],
            s.get("cursor"),
            int(s.get("expect", 0)),
            int(s.get("port", spec.get("port", 0))),
        )
        for s in spec["streams"]
    ]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    opened = 0
    cpu0 = time.process_time()  # streams start receiving as soon as they open
    for chunk in range(0, len(states), 200):  # paced: the server's accept backlog
        group = []
        for state in states[chunk : chunk + 200]:
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(_follow(spec, state, ready, stop)))
            group.append(ready.wait())
        await asyncio.wait_for(asyncio.gather(*group), 60)
        opened += len(group)
    print("ready", flush=True)
    deadline = time.monotonic() + float(spec.get("timeout", 120))
    hold = float(spec.get("hold", 0))
    started = time.monotonic()
    completed: float | None = None  # when every stream first had its events
    while time.monotonic() < deadline:
        done = all(st.events >= st.expect for st in states)
        if done and completed is None:
            completed = time.monotonic()
        if done and time.monotonic() - started >= hold:
            break
        # Finely while events are awaited (``completed`` times them), coarsely
        # while only holding idle streams open.
        await asyncio.sleep(0.2 if hold and done else 0.01)
    finished = time.monotonic()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "opened": opened,
        "ok": sum(st.ok for st in states),
        "events": [st.events for st in states],
        "heartbeats": [st.heartbeats for st in states],
        "reconnects": sum(st.reconnects for st in states),
        "finished": finished,
        "completed": completed,
        "cpu_seconds": time.process_time() - cpu0,
        "complete": all(st.events >= st.expect for st in states),
        "numbers": [n for st in states for n in st.numbers],
    }


def write(spec: dict[str, Any]) -> dict[str, Any]:
    """Single-row transactions: at ``rate`` per second, or as fast as possible (rate 0)."""
    restaurants = [uuid.UUID(r) for r in spec["restaurants"]]
    sql = WRITE_SQL.format(table=spec.get("table", "relay_outbox"))
    rate = float(spec.get("rate", 0))
    first = int(spec.get("first", 1))
    commits: list[tuple[int, float]] = []
    with psycopg.connect(spec["database_url"], autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")
        print("ready", flush=True)
        began = time.monotonic()
        end = began + float(spec["seconds"])
        n = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if rate:
                due = began + n / rate
                if due > now:
                    time.sleep(due - now)
            seq = first + n
            restaurant = restaurants[seq % len(restaurants)]
            order = uuid.uuid4()
            payload = json.dumps(
                {
                    "orderId": str(order),
                    "restaurantId": str(restaurant),
                    "orderNumber": f"L-{seq}",
                    "newStatus": "Accepted",
                    "lastUpdateTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                }
            )
            conn.execute(sql, (uuid.uuid4(), restaurant, order, payload))
            if rate:
                commits.append((seq, time.monotonic()))
            n += 1
        elapsed = time.monotonic() - began
    return {"written": n, "seconds": elapsed, "commits": commits}


def burn(spec: dict[str, Any]) -> dict[str, Any]:
    """The CPU control: spin ``cores`` of a core in 2 ms slices, touching no database.

    Producers beside this burner show what the same amount of CPU, taken from
    them by anything at all, costs on this machine.
    """
    cores, seconds = float(spec["cores"]), float(spec["seconds"])
    slice_ = 0.002
    print("ready", flush=True)
    began = time.monotonic()
    cpu0 = time.process_time()
    while time.monotonic() - began < seconds:
        spin_until = time.perf_counter() + slice_ * min(1.0, cores)
        while time.perf_counter() < spin_until:
            pass
        time.sleep(slice_ * max(0.0, 1.0 - cores))
    return {"cores": (time.process_time() - cpu0) / (time.monotonic() - began)}


def main() -> None:
    mode, spec = sys.argv[1], json.loads(sys.stdin.readline())
    if mode == "subscribe":
        result = asyncio.run(subscribe(spec))
    elif mode == "write":
        result = write(spec)
    elif mode == "burn":
        result = burn(spec)
    elif mode == "peer":
        from relay.tools.bench.peers import drain  # only this mode needs the peers

        result = drain(spec)
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
