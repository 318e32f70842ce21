"""Column-level extremes a producer can write, through the real recorder on a real database.

Every value below is one PostgreSQL accepts in ``relay_outbox``: infinite
times and times in year 294276, routing columns that contradict the payload,
order numbers and event types of a hundred thousand characters, totals with
thousands of digits, JSON nested thousands deep. Whatever the mix, the
recorder never stops, each row is either an event every reader sees or a
dead letter its check files once with a short, specific reason, later rows
still flow, and what readers see keeps each restaurant's commit order.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg import sql

from relay import log as event_log
from relay.db import aconnect
from relay.log import ORIGIN, LogEvent, Page, Position, Selector
from relay.recorder import Recorder, RecorderConfig
from tests.helpers.db import Databases
from tests.helpers.orders import payload

# The producer's INSERT (SPEC §2): the eight contract columns, the time as a
# literal PostgreSQL parses, the payload as JSON text.
PRODUCER_INSERT = (
    "INSERT INTO relay_outbox (event_id, event_type, schema_version, restaurant_id, order_id,"
    " customer_id, payload, occurred_on_utc)"
    " VALUES (%s, %s, 1, %s, %s, %s, %s::text::jsonb, %s::text::timestamptz)"
)

UNLOADABLE_TIMES = [
    "-infinity",
    "infinity",
    "0001-12-31 23:59:59+00 BC",  # year 0
    "10000-01-01+00",
    "9999-12-31 23:30:00-01",  # year 10000 in UTC
    "294276-12-31 23:59:59+00",  # PostgreSQL's last
]
LOADABLE_TIMES = [
    "0001-01-01 00:00:00+00",
    "9999-12-31 23:59:59.999999+00",
    "2026-01-15 12:00:00+00",
    "2026-01-15 21:00:00+09",
    "1970-01-01 00:00:00+00",
]
# Zones either side of UTC: the relay's own session must load times alike in all.
ZONES = ["UTC", "Asia/Tokyo", "Pacific/Kiritimati", "America/Anchorage", "Etc/GMT+12"]
BAD_TOTALS = ["1e400", "NaN", "Infinity", "-1e15", "1e15", "0.0000001", "", "12,50"]
GOOD_TOTALS = ["42.50", "-0", "0", "1E+2", "999999999999999.999999", "0.000001"]
TYPES = ["OrderPaymentSucceeded", "OrderAccepted", "OrderPreparing"]
PLAIN_DECIMAL = re.compile(r"-?\d+(\.\d+)?")
MAX_REASON = 500


@dataclass(frozen=True)
class Spec:
    """How one row departs from a valid producer row (None: not at all)."""

    restaurant: int  # which of the example's two restaurants
    event_type: str
    occurred: str
    order_column: str  # "same", "null", "other"
    restaurant_column_differs: bool
    order_number_length: int | None
    total: str | int | None  # str: a JSON string; int: a JSON number of that many nines
    nesting: tuple[str, int] | None  # ("[" or "{", depth) of an extra field
    huge_type: tuple[str, int] | None  # (character, length) replacing the event type

    def fate(self) -> str:
        """Where the row must end: "dead" (a dead letter), "published", or "either"."""
        money = self.event_type == "OrderPaymentSucceeded"
        depth = self.nesting[1] if self.nesting else 0
        digits = self.total if isinstance(self.total, int) else 0
        dead = (
            self.occurred in UNLOADABLE_TIMES
            or self.huge_type is not None
            or self.event_type == "OrderDelayAlert"
            or self.order_column == "other"
            or self.restaurant_column_differs
            or (self.order_number_length or 0) > 100
            or digits > 4300  # past int()'s conversion limit, whatever the field
            or (money and (self.total in BAD_TOTALS or digits > 15))
        )
        if dead:
            return "dead"
        # Past ~1000 levels Python's decoder gives up (a dead letter); where exactly
        # depends on the interpreter and its recursion limit (Hypothesis raises it).
        return "either" if depth > 200 else "published"


EXTREMES = ["time", "order", "restaurant", "number", "total", "nesting", "type"]


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A valid row by default; up to three of its columns or fields pushed to an extreme
    (some of which are still valid: year 1, the last microsecond of 9999, "1E+2")."""
    extreme = draw(st.sets(st.sampled_from(EXTREMES), max_size=3))
    event_type = draw(st.sampled_from(TYPES))
    if "type" in extreme and draw(st.booleans()):
        event_type = "OrderDelayAlert"
    times = UNLOADABLE_TIMES + LOADABLE_TIMES if "time" in extreme else LOADABLE_TIMES
    digits = st.integers(1, 5000) | st.sampled_from([15, 16, 4300, 4301])
    return Spec(
        restaurant=draw(st.integers(0, 1)),
        event_type=event_type,
        occurred=draw(st.sampled_from(times)),
        order_column=draw(st.sampled_from(["same", "null", "other"] if "order" in extreme
                                          else ["same", "null"])),
        restaurant_column_differs="restaurant" in extreme and draw(st.booleans()),
        order_number_length=draw(st.sampled_from([100, 101]) | st.integers(1, 200_000))
        if "number" in extreme else None,
        total=draw(st.sampled_from(BAD_TOTALS) | digits) if "total" in extreme
        else draw(st.none() | st.sampled_from(GOOD_TOTALS)),
        nesting=(draw(st.sampled_from(["[", "{"])),
                 draw(st.integers(1, 5000) | st.sampled_from([10, 2000])))
        if "nesting" in extreme else None,
        huge_type=(draw(st.sampled_from(["X", "\x01", "é", "\u2028", '"', "\U000e0001"])),
                   draw(st.integers(81, 100_000)))
        if "type" in extreme and event_type != "OrderDelayAlert" else None,
    )  # fmt: skip


def _row(spec: Spec, restaurants: list[uuid.UUID]) -> tuple[Any, ...]:
    """The INSERT's parameters for ``spec``: a valid row of its type, then its extremes."""
    restaurant, order = restaurants[spec.restaurant], uuid.uuid4()
    event_type = spec.event_type
    body = payload(
        event_type if event_type in TYPES else "OrderAccepted",
        restaurant_id=restaurant,
        order_id=order,
    )
    if event_type == "OrderDelayAlert":
        body = {
            "orderId": str(order), "restaurantId": str(restaurant), "kind": "NotReady",
            "expectedBy": "2026-01-15T12:00:00Z", "detectedAt": "2026-01-15T12:10:00Z",
        }  # fmt: skip
    if spec.order_number_length is not None:
        body["orderNumber"] = "N" * spec.order_number_length
    if isinstance(spec.total, str):
        body["total"] = spec.total
    text = json.dumps(body)
    if isinstance(spec.total, int):
        text = text[:-1] + ', "total": ' + "9" * spec.total + "}"
    if spec.nesting is not None:
        bracket, depth = spec.nesting
        opening, closing = ("[", "]") if bracket == "[" else ('{"a": ', "}")
        inner = "[]" if bracket == "[" else "1"
        text = text[:-1] + ', "notes": ' + opening * depth + inner + closing * depth + "}"
    if spec.huge_type is not None:
        char, length = spec.huge_type
        event_type = char * length
    order_column = {"same": order, "null": None, "other": uuid.uuid4()}[spec.order_column]
    column_restaurant = uuid.uuid4() if spec.restaurant_column_differs else restaurant
    customer = uuid.uuid4()
    return (
        uuid.uuid4(),
        event_type,
        column_restaurant,
        order_column,
        customer,
        text,
        spec.occurred,
    )


@pytest.fixture(scope="module")
def fuzz_database(databases: Databases) -> Iterator[str]:
    """One database for every example: each uses restaurants and event ids of its own."""
    url = databases.create()
    try:
        yield url
    finally:
        databases.drop(url)


# A row no extreme touched: written after each example's rows, it must flow.
SENTINEL = Spec(0, "OrderAccepted", LOADABLE_TIMES[2], "same", False, None, None, None, None)


@dataclass
class Checked:
    """What the recorder's check handed on for the rows of one example."""

    events: dict[uuid.UUID, list[LogEvent]]
    rejected: dict[uuid.UUID, list[str]]


async def _record(url: str, ids: Sequence[uuid.UUID]) -> Checked:
    """Run the relay's recorder until its check has read every row of ``ids``.

    Its session is set up as in ``relay run``; anything it raises (other than
    a lost connection, which it survives) fails the test: that would be a
    crash loop holding up every reader.
    """
    wanted = set(ids)
    checked = Checked({}, {})
    done = asyncio.Event()

    def on_page(page: Page) -> None:
        for item in page.events:
            if (event_id := uuid.UUID(item.event_id)) in wanted:
                checked.events.setdefault(event_id, []).append(item)
        for rejected in page.rejected:
            if (event_id := uuid.UUID(rejected.event_id)) in wanted:
                checked.rejected.setdefault(event_id, []).append(rejected.reason)
        if wanted <= checked.events.keys() | checked.rejected.keys():
            done.set()

    stop = asyncio.Event()
    recorder = Recorder(url, RecorderConfig(batch_size=500, safety_sweep=0.05), on_page=on_page)
    running = asyncio.create_task(recorder.run(stop))
    finished = asyncio.create_task(done.wait())
    try:
        await asyncio.wait({running, finished}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        finished.cancel()
        await asyncio.wait_for(running, 10)  # re-raises what stopped the recorder
    assert done.is_set(), "the recorder's check never read every row"
    return checked


async def _read_restaurant(url: str, restaurant: uuid.UUID) -> list[LogEvent]:
    """A restaurant's events as a subscriber replays them from the start."""
    conn = await aconnect(url, autocommit=True, role="fuzz reader")
    try:
        head = await event_log.head(conn)
        events: list[LogEvent] = []
        after = ORIGIN
        while after < head.end:
            page = await event_log.read(
                conn, after, head.window, selector=Selector(restaurants=(restaurant,))
            )
            events += page.events
            after = page.reached
        return events
    finally:
        await conn.close()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(specs(), min_size=1, max_size=8),
    producer_zone=st.sampled_from(ZONES),
    database_zone=st.sampled_from(ZONES),
)
def test_any_column_values_are_events_or_dead_letters_once_and_never_stop_the_recorder(
    fuzz_database: str, rows: list[Spec], producer_zone: str, database_zone: str
) -> None:
    """What a producer can write must never raise out of the recorder (a crash
    loop holding up every reader): each row is either an event readers see
    or a dead letter with a short reason that is not "internal error", and the
    row written after them is an event."""
    url = fuzz_database
    rows = [*rows, SENTINEL]
    restaurants = [uuid.uuid4(), uuid.uuid4()]
    params = [_row(spec, restaurants) for spec in rows]
    with psycopg.connect(url, autocommit=True) as conn:
        # The zone new sessions start in; the relay's sessions must not depend on it.
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET TimeZone = {}").format(
                sql.Identifier(conn.info.dbname), sql.Literal(database_zone)
            )
        )
        conn.execute(sql.SQL("SET TimeZone = {}").format(sql.Literal(producer_zone)))
        for values in params:
            conn.execute(PRODUCER_INSERT, values)  # each its own transaction

    ids = [values[0] for values in params]
    checked = asyncio.run(_record(url, ids))
    read = {r: asyncio.run(_read_restaurant(url, r)) for r in restaurants}
    published = {
        event_id: e
        for events in read.values()
        for e in events
        if (event_id := uuid.UUID(e.event_id)) in ids
    }
    with psycopg.connect(url) as conn:
        dead: dict[uuid.UUID, list[str]] = {}
        for event_id, reason in conn.execute(
            "SELECT event_id, reason FROM relay_dead_letters WHERE event_id = ANY(%s)", (ids,)
        ):
            dead.setdefault(event_id, []).append(reason)

    # The recorder's check and every reader agree, row by row (validation is
    # deterministic); the check handed each row on once.
    assert all(len(v) == 1 for v in checked.events.values())
    assert all(len(v) == 1 for v in checked.rejected.values())
    assert checked.events.keys() == published.keys()
    assert {e: [r] for e, [r] in checked.rejected.items()} == dead
    for event_id, [handed] in checked.events.items():
        assert handed == published[event_id]

    for spec, event_id in zip(rows, ids, strict=True):
        where = (spec, "published" if event_id in published else dead.get(event_id))
        assert (event_id in published) + len(dead.get(event_id, [])) == 1, where
        for reason in dead.get(event_id, []):
            # Short; the exact 500 is pinned by the test below.
            assert len(reason) <= MAX_REASON, (spec, len(reason), reason[:600])
            assert not reason.startswith("internal error"), where
        fate = spec.fate()
        event(f"fate: {fate}")
        if fate != "either":
            assert ("published" if event_id in published else "dead") == fate, where
        if event_id in published:
            text = published[event_id].data
            assert len(text) < 2000, where  # no oversized frame
            data = json.loads(text)
            assert data["eventId"] == str(event_id), where
            if "total" in data:
                assert PLAIN_DECIMAL.fullmatch(data["total"]), where
    assert ids[-1] in published  # later rows still flow

    # Per restaurant, readers see the events in insert (here: commit) order.
    for restaurant, events in read.items():
        mine = [uuid.UUID(e.event_id) for e in events if uuid.UUID(e.event_id) in published]
        assert mine == [
            i for i in ids if i in published and published[i].restaurant_id == str(restaurant)
        ]
        positions: list[Position] = [e.at for e in events]
        assert all(a < b for a, b in pairwise(positions))


def test_a_reason_is_at_most_500_characters_whatever_the_event_type(fuzz_database: str) -> None:
    """An event type of control characters: its quoted form is four times
    its length, and the reason must still fit the 500 characters an operator
    is promised, with the list of known types intact."""
    url = fuzz_database
    event_id = uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            PRODUCER_INSERT,
            (event_id, "\x01" * 81, uuid.uuid4(), None, None, "{}", "2026-01-15 12:00:00+00"),
        )
    checked = asyncio.run(_record(url, [event_id]))
    assert event_id in checked.rejected
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT reason FROM relay_dead_letters WHERE event_id = %s", (event_id,)
        ).fetchone()
    assert row is not None
    assert len(row[0]) <= MAX_REASON, len(row[0])
