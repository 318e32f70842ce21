"""The claim → publish transaction against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from relay import log as event_log
from relay.dispatcher import batch, claim_and_publish
from relay.errors import ConfigError
from relay.log import LogEvent, Stream, partition_of
from relay.outbox import enqueue
from relay.sql import query
from tests.helpers.orders import CHAIN, INSERT_SQL, event, payload


async def _conn(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def _log_rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT partition, position, event_type, restaurant_id, data::text"
            " FROM relay_events ORDER BY partition, position"
        ).fetchall()


async def test_publishes_committed_rows_in_order_and_empties_the_outbox(database_url: str) -> None:
    restaurants = [uuid.uuid4() for _ in range(3)]
    with psycopg.connect(database_url) as conn:
        for r in restaurants:
            order = uuid.uuid4()
            for kind in CHAIN:
                enqueue(conn, event(kind, restaurant_id=r, order_id=order))
    conn_a = await _conn(database_url)
    result = await claim_and_publish(conn_a, batch_size=500)
    await conn_a.close()
    assert result.claimed == 12 and len(result.events) == 12
    rows = _log_rows(database_url)
    for r in restaurants:
        mine = [row for row in rows if row[3] == r]
        assert [row[2] for row in mine] == CHAIN
        positions = [row[1] for row in mine]
        assert positions == sorted(positions) and len(set(positions)) == 4
        assert all(row[0] == partition_of(r) for row in mine)
        assert all("customerName" not in row[4] for row in mine)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (0,)


async def test_partition_matches_the_database_function(database_url: str) -> None:
    ids = [uuid.uuid4() for _ in range(200)]
    with psycopg.connect(database_url) as conn:
        got = conn.execute(
            "SELECT r, get_byte(uuid_send(r), 15) & 63 FROM unnest(%s::uuid[]) AS r", (ids,)
        ).fetchall()
    assert all(partition_of(r) == p for r, p in got)


async def test_late_commit_lands_after_the_position_a_reader_has_seen(database_url: str) -> None:
    """T1 inserts first but commits last: it must appear above T2's position."""
    restaurant = uuid.uuid4()
    slow = psycopg.connect(database_url)
    enqueue(slow, event("OrderAccepted", restaurant_id=restaurant))  # T1: uncommitted
    with psycopg.connect(database_url) as fast:
        enqueue(fast, event("OrderPreparing", restaurant_id=restaurant))  # T2 commits
    conn = await _conn(database_url)
    first = await claim_and_publish(conn, batch_size=500)
    assert [e.event_type for e in first.events] == ["OrderPreparing"]
    seen = first.events[-1].position
    slow.commit()
    slow.close()
    second = await claim_and_publish(conn, batch_size=500)
    assert [e.event_type for e in second.events] == ["OrderAccepted"]
    resumed = await event_log.replay(conn, Stream.restaurant(restaurant), seen)
    await conn.close()
    assert [e.sse_event for e in resumed] == ["OrderStatusChanged"]
    assert resumed[0].position > seen


async def test_rolled_back_rows_are_never_published(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
        conn.rollback()
        enqueue(conn, event("OrderPreparing", restaurant_id=restaurant))
    aconn = await _conn(database_url)
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in result.events] == ["OrderPreparing"]


async def test_a_failed_publish_rolls_back_and_the_connection_claims_again(
    database_url: str,
) -> None:
    """The log refusing a row (here a trigger) undoes the whole batch, nothing half-moved."""
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'log refuses writes'; END$$;"
            " CREATE TRIGGER refuse BEFORE INSERT ON relay_events"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    with psycopg.connect(database_url) as conn:
        for kind in CHAIN:
            enqueue(conn, event(kind, restaurant_id=restaurant))
    aconn = await _conn(database_url)
    with pytest.raises(psycopg.errors.RaiseException, match="log refuses writes"):
        await claim_and_publish(aconn, batch_size=500)
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (4,)
        assert conn.execute("SELECT max(last_position) FROM relay_partitions").fetchone() == (0,)
        conn.execute("DROP TRIGGER refuse ON relay_events")
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in result.events] == CHAIN
    assert [e.position for e in result.events] == [1, 2, 3, 4]


async def test_counters_match_what_a_batch_announces_when_a_planned_row_is_gone(
    database_url: str,
) -> None:
    """A claim reads the outbox in its statement's snapshot, so with two replicas
    a planned row can already be gone when the publish runs. The partition
    counter must still say what the NOTIFY and the in-memory hand-over say (the
    planned positions): a hub that trusted an announced position the counter
    did not take would skip the events later published there. Here a trigger
    keeps the last row as if another replica had taken it."""
    restaurant = uuid.uuid4()
    partition = partition_of(restaurant)
    with psycopg.connect(database_url) as conn:
        for kind in CHAIN:
            enqueue(conn, event(kind, restaurant_id=restaurant))
    with psycopg.connect(database_url, autocommit=True) as conn:
        (last_id,) = conn.execute("SELECT max(id) FROM relay_outbox").fetchone()  # type: ignore[misc]
        conn.execute(
            "CREATE FUNCTION keep_row() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$BEGIN IF OLD.id = {int(last_id)} THEN RETURN NULL; END IF; RETURN OLD; END$$;"
            " CREATE TRIGGER keep_row BEFORE DELETE ON relay_outbox"
            " FOR EACH ROW EXECUTE FUNCTION keep_row()"
        )
    aconn = await _conn(database_url)
    first = await claim_and_publish(aconn, batch_size=500)
    with psycopg.connect(database_url, autocommit=True) as conn:
        counter = conn.execute(
            "SELECT last_position FROM relay_partitions WHERE partition = %s", (partition,)
        ).fetchone()
        conn.execute("DROP TRIGGER keep_row ON relay_outbox")
    assert first.heads[partition] == (1, 4) and counter == (4,)
    assert [e.position for e in first.events] == [1, 2, 3]  # 4 is a hole, never reused
    again = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [(e.event_type, e.position) for e in again.events] == [(CHAIN[-1], 5)]


async def test_claims_survive_the_session_forgetting_prepared_statements(
    database_url: str,
) -> None:
    """The claim is a server-side prepared statement; DEALLOCATE ALL (or a new
    connection) makes the next claim prepare it again instead of failing."""
    restaurant = uuid.uuid4()
    aconn = await _conn(database_url)
    assert (await claim_and_publish(aconn, batch_size=500)).claimed == 0
    await aconn.execute("DEALLOCATE ALL")
    with psycopg.connect(database_url) as conn:
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in result.events] == ["OrderAccepted"]


HOSTILE = "B-1'); DROP TABLE relay_events; -- 100% \\ \\' \" \\u0000 ñ 🍕 $$ E'x'"


@pytest.mark.parametrize("filler", [0, 40], ids=["one-trip-json", "binary-arrays"])
async def test_quotes_and_escapes_in_payloads_reach_the_log_verbatim(
    database_url: str, filler: int
) -> None:
    """Small batches publish as one quoted JSON literal, large ones as binary
    arrays: either way hostile text lands exactly as rendered."""
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(filler):
            enqueue(conn, event("OrderPreparing", restaurant_id=uuid.uuid4()))
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=order,
                            order_number=HOSTILE))  # fmt: skip
        bad = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
        bad["newStatus"] = HOSTILE  # dead-lettered: the reason quotes it back
        conn.execute(INSERT_SQL, (str(uuid.uuid4()), "OrderPreparing", str(restaurant),
                                  str(order), None, json.dumps(bad)))  # fmt: skip
    aconn = await _conn(database_url)
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert result.claimed == filler + 2
    assert result.dead_lettered == 1 and len(result.events) == filler + 1
    (accepted,) = [e for e in result.events if e.event_type == "OrderAccepted"]
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT data::text FROM relay_events WHERE event_id = %s", (accepted.event_id,)
        ).fetchone()
        reason = conn.execute("SELECT reason FROM relay_dead_letters").fetchone()
    assert stored == (accepted.data,)
    assert json.loads(accepted.data)["orderNumber"] == HOSTILE
    assert reason is not None and HOSTILE[:40] in reason[0]


async def test_a_session_that_cannot_keep_prepared_statements_is_named_and_loses_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a transaction-mode pooler each query may land on another server
    session, so the claim prepared a moment ago is missing again. Simulated by
    a preparation that prepares nothing: the error names the cause, the row stays."""
    monkeypatch.setattr(batch, "_PREPARE", b"SELECT 1")
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    aconn = await _conn(database_url)
    with pytest.raises(ConfigError, match="pooler in session mode"):
        await claim_and_publish(aconn, batch_size=500)
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    await aconn.close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM relay_events").fetchone() == (0,)


async def test_poison_row_is_dead_lettered_and_later_rows_flow(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    bad = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
    bad["newStatus"] = "Delivered"  # does not match the event type
    with psycopg.connect(database_url) as conn:
        enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=order))
        conn.execute(
            INSERT_SQL,
            (uuid.uuid4(), "OrderPreparing", restaurant, order, None, json.dumps(bad)),
        )
        conn.execute(
            INSERT_SQL, (uuid.uuid4(), "OrderTeleported", restaurant, order, None, json.dumps(bad))
        )
        conn.commit()
        enqueue(conn, event("OrderReadyForDelivery", restaurant_id=restaurant, order_id=order))
    aconn = await _conn(database_url)
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in result.events] == ["OrderAccepted", "OrderReadyForDelivery"]
    assert result.dead_lettered == 2
    with psycopg.connect(database_url) as conn:
        reasons = [r for (r,) in conn.execute("SELECT reason FROM relay_dead_letters ORDER BY id")]
    assert "newStatus" in reasons[0]
    assert "OrderTeleported" in reasons[1]


async def test_an_oversized_field_is_dead_lettered_and_the_next_row_flows(
    database_url: str,
) -> None:
    """A 20,000-character order number would be broadcast to every dashboard of
    the restaurant: it is refused with a short reason instead."""
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    big = payload("OrderAccepted", restaurant_id=restaurant, order_id=order)
    big["orderNumber"] = "N" * 20_000
    with psycopg.connect(database_url) as conn:
        conn.execute(INSERT_SQL, (str(uuid.uuid4()), "OrderAccepted", str(restaurant),
                                  str(order), None, json.dumps(big)))  # fmt: skip
        enqueue(conn, event("OrderPreparing", restaurant_id=restaurant))
    aconn = await _conn(database_url)
    result = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in result.events] == ["OrderPreparing"]
    assert result.dead_lettered == 1
    with psycopg.connect(database_url) as conn:
        (reason,) = conn.execute("SELECT reason FROM relay_dead_letters").fetchone() or ("",)
    assert "orderNumber: longer than 100 characters (20000)" in reason and len(reason) < 500


async def test_reinserted_published_event_is_not_published_twice(database_url: str) -> None:
    restaurant = uuid.uuid4()
    once = event("OrderAccepted", restaurant_id=restaurant)
    with psycopg.connect(database_url) as conn:
        enqueue(conn, once)
    aconn = await _conn(database_url)
    await claim_and_publish(aconn, batch_size=500)
    with psycopg.connect(database_url) as conn:
        enqueue(conn, once)  # the producer retries after a timeout it misread
        enqueue(conn, event("OrderPreparing", restaurant_id=restaurant))
    second = await claim_and_publish(aconn, batch_size=500)
    await aconn.close()
    assert [e.event_type for e in second.events] == ["OrderPreparing"]
    assert len(_log_rows(database_url)) == 2


async def test_retention_deletes_only_old_published_events(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(30):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
    aconn = await _conn(database_url)
    await claim_and_publish(aconn, batch_size=500)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE relay_events SET published_at = now() - interval '2 days'"
            " WHERE position <= (SELECT min(position) + 24 FROM relay_events)"
        )
        enqueue_conn = psycopg.connect(database_url)
        enqueue(enqueue_conn, event("OrderPreparing", restaurant_id=restaurant))
        enqueue_conn.commit()
        enqueue_conn.close()
    deleted = await event_log.prune(aconn, timedelta(hours=24), batch=10)
    await aconn.close()
    assert deleted == 25
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_events").fetchone() == (5,)
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (1,)
        pruned = conn.execute(
            "SELECT pruned_through FROM relay_partitions WHERE partition = %s",
            (partition_of(restaurant),),
        ).fetchone()
    assert pruned == (25,)


@pytest.mark.parametrize("batch_size", [1, 7])
async def test_small_batches_keep_order(database_url: str, batch_size: int) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for kind in CHAIN:
            enqueue(conn, event(kind, restaurant_id=restaurant, order_id=order))
    aconn = await _conn(database_url)
    published: list[LogEvent] = []
    while (result := await claim_and_publish(aconn, batch_size=batch_size)).claimed:
        published.extend(result.events)
    await aconn.close()
    assert [e.event_type for e in published] == CHAIN
    assert [e.position for e in published] == [1, 2, 3, 4]


async def test_retention_runs_while_claiming_continues(database_url: str) -> None:
    """Pruning in small batches never blocks the claim, and never touches pending rows."""
    import asyncio

    restaurants = [uuid.uuid4() for _ in range(8)]
    with psycopg.connect(database_url) as conn:
        for i in range(400):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurants[i % 8]))
    claimer = await _conn(database_url)
    pruner = await _conn(database_url)
    while (await claim_and_publish(claimer, batch_size=100)).claimed:
        pass
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE relay_events SET published_at = now() - interval '3 days'")
        for i in range(400):
            with conn.transaction():
                enqueue(conn, event("OrderPreparing", restaurant_id=restaurants[i % 8]))

    async def claim_all() -> int:
        # A partition the pruner is marking at that instant is skipped, not
        # waited for, so an empty claim may come while its rows are pending:
        # stop only once an empty claim finds the outbox empty too.
        total = 0
        while True:
            result = await claim_and_publish(claimer, batch_size=20)
            total += result.claimed
            if not result.claimed:
                cur = await claimer.execute("SELECT EXISTS (SELECT FROM relay_outbox)")
                if await cur.fetchone() == (False,):
                    return total
            await asyncio.sleep(0)

    claimed, pruned = await asyncio.gather(
        claim_all(), event_log.prune(pruner, timedelta(hours=24), batch=7)
    )
    await claimer.close()
    await pruner.close()
    assert claimed == 400 and pruned == 400
    rows = _log_rows(database_url)
    assert len(rows) == 400 and {r[2] for r in rows} == {"OrderPreparing"}


def _fill_partitions(url: str, per_partition: int) -> None:
    """``per_partition`` pending events in each of the 64 partitions (one restaurant each)."""
    restaurants: dict[int, uuid.UUID] = {}
    while len(restaurants) < 64:
        r = uuid.uuid4()
        restaurants.setdefault(partition_of(r), r)
    with psycopg.connect(url) as conn:
        for r in restaurants.values():
            for _ in range(per_partition):
                enqueue(conn, event("OrderAccepted", restaurant_id=r, order_id=uuid.uuid4()))


async def test_live_load_is_claimed_in_one_batch_across_all_partitions(database_url: str) -> None:
    # A few rows in every partition (producers are live, no backlog): one
    # claim takes them all, and says there is no reason to claim again at once.
    _fill_partitions(database_url, 3)
    conn = await _conn(database_url)
    try:
        result = await claim_and_publish(conn, batch_size=500)
    finally:
        await conn.close()
    assert result.claimed == 192 and len(result.heads) == 64
    assert not result.more


async def test_backlog_leaves_partitions_for_another_replica(database_url: str) -> None:
    # A backlog in every partition: a claim holds only batch/share partitions,
    # so a second dispatcher claiming meanwhile gets a disjoint set of them.
    _fill_partitions(database_url, 40)
    holder = await _conn(database_url)
    other = await _conn(database_url)
    try:
        async with holder.transaction():
            cur = await holder.execute(
                query("claim"), {"batch_size": 500, "backlog_partitions": 16}
            )
            held = {int(row[2]) for row in await cur.fetchall()}
            result = await claim_and_publish(other, batch_size=500)
        assert len(held) == 16
        assert len(result.heads) == 16 and not held & set(result.heads)
        assert result.claimed == 16 * 32 and result.more
    finally:
        await holder.close()
        await other.close()


async def test_backlog_in_one_partition_fills_whole_batches(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(600):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant, order_id=uuid.uuid4()))
    conn_a = await _conn(database_url)
    try:
        first = await claim_and_publish(conn_a, batch_size=500)
        second = await claim_and_publish(conn_a, batch_size=500)
    finally:
        await conn_a.close()
    assert (first.claimed, first.more) == (500, True)
    assert (second.claimed, second.more) == (100, False)


async def test_two_replicas_never_publish_rows_the_other_already_moved(database_url: str) -> None:
    """Two dispatchers drain one backlog at once. A claim reads rows in its
    statement's snapshot but locks the newest counter row, so a partition the
    other replica published in between would hand it rows already moved. Such
    a partition is left alone (and claimed again at once): every row is
    claimed exactly once, and positions have no holes."""
    _fill_partitions(database_url, 40)  # 2,560 rows, every partition contended
    conns = [await _conn(database_url) for _ in range(2)]
    claimed = [0, 0]
    stale = [0, 0]

    async def drain(i: int) -> None:
        idle = 0
        while idle < 3:  # an empty claim may come while the other holds the rest
            result = await claim_and_publish(conns[i], batch_size=200, backlog_partitions=64)
            claimed[i] += result.claimed
            stale[i] += result.stale
            idle = 0 if result.claimed or result.more else idle + 1

    try:
        await asyncio.gather(drain(0), drain(1))
    finally:
        for conn in conns:
            await conn.close()
    rows = _log_rows(database_url)
    assert sum(claimed) == len(rows) == 64 * 40
    by_partition: dict[int, list[int]] = {}
    for partition, position, *_ in rows:
        by_partition.setdefault(partition, []).append(position)
    assert all(p == list(range(1, 41)) for p in by_partition.values())  # no holes
    with psycopg.connect(database_url) as check:
        assert check.execute("SELECT count(*) FROM relay_outbox").fetchone() == (0,)
    assert claimed[0] > 0 and claimed[1] > 0  # both really took part
