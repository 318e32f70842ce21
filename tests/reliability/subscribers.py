"""SSE subscribers that hop between relay processes, and the check of what they received.

Shared by the end-to-end fault tests: each subscriber is a real HTTP client
that hangs up after a random number of frames, reconnects to a random relay
and resumes with Last-Event-ID, recording every event it got. The check then
holds what they received against the writers' ledger: every committed event
of a subscriber's restaurant exactly once, in order, nothing rolled back and
nothing foreign.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import httpx

from relay.errors import InvalidCursor
from relay.log import Position
from tests.helpers.relay_process import RelayProcess, parse_frames
from tests.helpers.sse import from_start
from tests.reliability.ledger import Ledger, out_of_commit_order

__all__ = ["Subscriber", "check_deliveries", "received_all"]


@dataclass
class Subscriber:
    restaurant: uuid.UUID
    token: str
    rng: random.Random
    received: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # cursor, event id, restaurant
    cursor: str = ""
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    # Frames after which it hangs up and resumes elsewhere, drawn per connection.
    budget: tuple[int, int] = (20, 400)

    def run(self, relays: Sequence[RelayProcess], stop: threading.Event) -> None:
        self.cursor = from_start()  # from the start of the log
        while not stop.is_set():
            relay = self.rng.choice(relays)
            url = f"{relay.url}/v1/restaurants/{self.restaurant}/stream"
            budget = self.rng.randint(*self.budget)  # hang up after this many frames
            try:
                with httpx.stream(
                    "GET", url, headers={"Authorization": f"Bearer {self.token}",
                                         "Last-Event-ID": self.cursor},
                    timeout=httpx.Timeout(5.0, read=4.0),
                ) as response:  # fmt: skip
                    if response.status_code != 200:
                        time.sleep(0.2)
                        continue
                    self.reconnects += 1
                    tail = ""
                    for text in response.iter_text():
                        frames, _comments, tail = parse_frames(tail + text)
                        for frame in frames:
                            if frame.event == "reset":
                                self.errors.append(f"reset at {self.cursor}: {frame.data}")
                            elif frame.event is not None:
                                data = json.loads(frame.data)
                                self.received.append(
                                    (frame.id or "", data["eventId"], data["restaurantId"])
                                )
                                budget -= 1
                            if frame.id:
                                self.cursor = frame.id
                        if budget <= 0 or stop.is_set():
                            break
            except (httpx.HTTPError, OSError):
                time.sleep(0.1)


def received_all(ledger: Ledger, subscribers: Sequence[Subscriber]) -> bool:
    """Whether every subscriber holds as many distinct events as were
    committed for its restaurant (the point to stop waiting and check)."""
    with ledger.lock:
        want: dict[uuid.UUID, int] = defaultdict(int)
        for _e, r, _o, _k in ledger.committed:
            want[r] += 1
    return all(len({e for _c, e, _r in s.received}) >= want[s.restaurant] for s in subscribers)


def check_deliveries(ledger: Ledger, subscribers: Sequence[Subscriber]) -> list[str]:
    """What is wrong with what the subscribers received, against the ledger."""
    problems: list[str] = []
    by_restaurant: dict[uuid.UUID, list[str]] = defaultdict(list)
    for event_id, restaurant, _order, _kind in ledger.committed:
        by_restaurant[restaurant].append(str(event_id))
    rolled_back = {str(e) for e in ledger.rolled_back}
    for sub in subscribers:
        ids = [eid for _c, eid, _r in sub.received]
        foreign = [r for _c, _e, r in sub.received if r != str(sub.restaurant)]
        if foreign:
            problems.append(f"{sub.restaurant}: received {len(foreign)} foreign event(s)")
        dupes = len(ids) - len(set(ids))
        if dupes:
            problems.append(f"{sub.restaurant}: {dupes} duplicate deliveries")
        missing = set(by_restaurant[sub.restaurant]) - set(ids)
        if missing:
            problems.append(f"{sub.restaurant}: missing {len(missing)}, e.g. {sorted(missing)[:2]}")
        if rolled_back & set(ids):
            problems.append(f"{sub.restaurant}: received rolled-back events")
        positions = [p for c, _e, _r in sub.received if (p := _position(c)) is not None]
        if len(positions) != len(sub.received):
            problems.append(f"{sub.restaurant}: frames without a cursor of the log")
        if any(b <= a for a, b in pairwise(positions)):
            problems.append(f"{sub.restaurant}: positions out of order")
        problems += out_of_commit_order(ledger, [uuid.UUID(e) for e in ids])
        mine, got = set(by_restaurant[sub.restaurant]), set(ids)
        committed_order = [e for e in ids if e in mine]
        expected_order = [e for e in by_restaurant[sub.restaurant] if e in got]
        # Causal chains: per order, the received order must match the commit order.
        if not _chains_agree(ledger, committed_order, expected_order):
            problems.append(f"{sub.restaurant}: an order's events arrived out of causal order")
        problems.extend(sub.errors[:1])
    return problems


def _position(cursor: str) -> Position | None:
    """The log position a frame id names (the id is opaque to clients; this
    test reads it to prove the order)."""
    try:
        return Position.parse(cursor)
    except InvalidCursor:
        return None


def _chains_agree(ledger: Ledger, received: list[str], committed: list[str]) -> bool:
    order_of = {str(e): o for e, _r, o, _k in ledger.committed}
    got: dict[uuid.UUID, list[str]] = defaultdict(list)
    want: dict[uuid.UUID, list[str]] = defaultdict(list)
    for e in received:
        got[order_of[e]].append(e)
    for e in committed:
        want[order_of[e]].append(e)
    return got == want
