"""Async SSE subscribers over real HTTP, and a bulk producer, for gateway tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field

import httpx
import psycopg

from relay.log import Position
from tests.helpers.relay_process import Frame, parse_frames

# One transaction per batch: order events for `restaurant`, each order a full
# chain, written as the producer would (camelCase payload, contract columns).
BULK_SQL = """
INSERT INTO relay_outbox (event_id, event_type, schema_version, restaurant_id, order_id,
                          payload, occurred_on_utc)
SELECT gen_random_uuid(), 'OrderAccepted', 1, %(restaurant)s, o.id,
       jsonb_build_object(
           'orderId', o.id, 'restaurantId', %(restaurant)s::uuid,
           'orderNumber', 'B-' || o.n, 'newStatus', 'Accepted',
           'lastUpdateTimestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'occurredOnUtc', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'customerName', 'Ada Lovelace'),
       now()
FROM (SELECT gen_random_uuid() AS id, n
      FROM generate_series(%(first)s::int, %(last)s::int) AS n) AS o
ORDER BY o.n
"""


def bulk_accepted(url: str, restaurant: uuid.UUID, count: int, *, per_tx: int = 2000) -> None:
    """``count`` OrderAccepted events for ``restaurant``, numbered B-1… in commit order."""
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(1, count + 1, per_tx):
            last = min(count, first + per_tx - 1)
            conn.execute(BULK_SQL, {"restaurant": restaurant, "first": first, "last": last})


def from_start(scope: str = "") -> str:
    """A cursor before every event of a test database: after window 0, which
    holds only events retained from before the windows (none in a fresh
    database). ``scope``: the stream's fingerprint, for sets and customers."""
    return Position.end_of(0).encode(scope)


# Retention, everything at once: the rows of every recorded window go, and
# cursors below the newest window become unservable.
PRUNE_SQL = """
WITH newest AS (SELECT max(window_id) AS window_id FROM relay_windows),
pruned AS (
    DELETE FROM relay_outbox AS o
    USING relay_windows AS w, newest
    WHERE w.window_id = newest.window_id AND pg_visible_in_snapshot(o.xid, w.snapshot)
    RETURNING o.id
),
bounds AS (
    UPDATE relay_log_bounds SET pruned_through = (SELECT window_id FROM newest)
)
SELECT count(*) FROM pruned
"""


def prune_everything(url: str) -> int:
    """Retention with a zero window: the number of events it removed."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(PRUNE_SQL).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Subscriber:
    """One SSE stream read by a task: frames, comments, and how it ended."""

    client: httpx.AsyncClient
    url: str
    token: str | None = None
    last_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    frames: list[Frame] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    status: int | None = None
    response_headers: httpx.Headers | None = None
    first_chunk: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # response headers seen
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # first cursor seen: subscribed
    _task: asyncio.Task[None] | None = None

    def start(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        return self

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.event and f.event != "reset"]

    async def _run(self) -> None:
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        try:
            async with self.client.stream("GET", self.url, headers=headers) as response:
                self.status = response.status_code
                self.response_headers = response.headers
                self.connected.set()
                tail = ""
                async for text in response.aiter_text():
                    if not self.first_chunk:
                        self.first_chunk = text
                    frames, comments, tail = parse_frames(tail + text)
                    self.comments.extend(comments)
                    for frame in frames:
                        if frame.id:
                            self.last_id = frame.id
                            self.ready.set()
                        self.frames.append(frame)
        except (httpx.HTTPError, OSError):
            pass  # the server closed or went away: `ended` tells the test
        finally:
            self.connected.set()
            self.ready.set()
            self.ended.set()

    async def wait_for(self, count: int, timeout: float = 30) -> list[Frame]:
        """Wait until ``count`` event frames arrived (or the stream ended)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.events) < count and not self.ended.is_set():
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        return self.events

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def client(connections: int = 100) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(10, read=60),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0),
    )
