"""Column-level extremes a producer can write, through the real claim on a real database.

Every value below is one PostgreSQL accepts in ``relay_outbox``: infinite
times and times in year 294276, routing columns that contradict the payload,
order numbers and event types of a hundred thousand characters, totals with
thousands of digits, JSON nested thousands deep. Whatever the mix, the claim
never raises, each row is published or dead-lettered exactly once with a
short, specific reason, and what is published keeps each restaurant's order.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg import sql

from relay.db import aconnect
from relay.dispatcher import claim_and_publish
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


async def _claim_everything(url: str) -> None:
    """Claim until nothing is pending, on a session set up as the relay sets up its own."""
    conn = await aconnect(url, autocommit=True, role="dispatcher")
    try:
        for _ in range(50):
            result = await claim_and_publish(conn, batch_size=500)
            if result.claimed == 0 and not result.more:
                return
        raise AssertionError("the claim kept finding work")
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
def test_any_column_values_are_published_or_dead_lettered_once_and_never_stop_the_claim(
    fuzz_database: str, rows: list[Spec], producer_zone: str, database_zone: str
) -> None:
    """What a producer can write must never raise out of the claim (that is a
    crash loop holding every partition): each row is either an event in the
    log or a dead letter with a short reason that is not "internal error"."""
    url = fuzz_database
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
            conn.execute(PRODUCER_INSERT, values)

    asyncio.run(_claim_everything(url))

    ids = [values[0] for values in params]
    with psycopg.connect(url) as conn:
        published = {
            event_id: (restaurant, position, data)
            for event_id, restaurant, position, data in conn.execute(
                "SELECT event_id, restaurant_id, position, data::text"
                " FROM relay_events WHERE event_id = ANY(%s)",
                (ids,),
            )
        }
        dead: dict[uuid.UUID, list[str]] = {}
        for event_id, reason in conn.execute(
            "SELECT event_id, reason FROM relay_dead_letters WHERE event_id = ANY(%s)", (ids,)
        ):
            dead.setdefault(event_id, []).append(reason)
        pending = conn.execute(
            "SELECT count(*) FROM relay_outbox WHERE event_id = ANY(%s)", (ids,)
        ).fetchone()
    assert pending == (0,)

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
            text = published[event_id][2]
            assert len(text) < 2000, where  # no oversized frame
            data = json.loads(text)
            if "total" in data:
                assert PLAIN_DECIMAL.fullmatch(data["total"]), where

    # Per restaurant, the published rows are in insert (here: commit) order.
    for restaurant in restaurants:
        mine = [published[i] for i in ids if i in published and published[i][0] == restaurant]
        positions = [p[1] for p in mine]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)


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
    asyncio.run(_claim_everything(url))
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT reason FROM relay_dead_letters WHERE event_id = %s", (event_id,)
        ).fetchone()
    assert row is not None
    assert len(row[0]) <= MAX_REASON, len(row[0])
