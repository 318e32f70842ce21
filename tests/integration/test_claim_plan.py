"""The claim stays on its indexes however much history the log holds."""

from __future__ import annotations

import json
import uuid

import psycopg

from relay.sql import query


def test_claim_never_scans_the_outbox_or_the_log(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # 1,000,000 published events in the log, 100 pending in the outbox,
        # plus 100,000 claimed-but-not-vacuumed outbox rows (dead tuples).
        conn.execute(
            """
            INSERT INTO relay_events (partition, position, event_id, event_type, schema_version,
                sse_event, restaurant_id, channels, data, occurred_on_utc, enqueued_at)
            SELECT g % 64, g, gen_random_uuid(), 'OrderAccepted', 1, 'OrderStatusChanged',
                   gen_random_uuid(), '{}', '{}', now(), now()
            FROM generate_series(1, 1000000) AS g
            """
        )
        conn.execute(
            """
            INSERT INTO relay_outbox (event_id, event_type, restaurant_id, payload, occurred_on_utc)
            SELECT gen_random_uuid(), 'OrderAccepted', gen_random_uuid(), '{}', now()
            FROM generate_series(1, 100000)
            """
        )
        conn.execute("DELETE FROM relay_outbox")
        for _ in range(100):
            conn.execute(
                "INSERT INTO relay_outbox (event_id, event_type, restaurant_id, payload,"
                " occurred_on_utc) VALUES (%s, 'OrderAccepted', %s, %s, now())",
                (uuid.uuid4(), uuid.uuid4(), json.dumps({})),
            )
        conn.execute("ANALYZE relay_outbox")
        conn.execute("ANALYZE relay_events")
        plans = []
        with conn.transaction():
            plans.append(_plan(conn, query("claim"), {"batch_size": 500, "backlog_partitions": 16}))
            plans.append(
                _plan(
                    conn,
                    query("replay_channel_restaurant"),
                    {"restaurant_id": uuid.uuid4(), "after": 10, "channel": "x", "limit": 100},
                )
            )
            plans.append(
                _plan(
                    conn,
                    query("read_partition"),
                    {"partition": 3, "after": 10, "through": 900, "limit": 100},
                )
            )
    for plan in plans:
        assert "Seq Scan on relay_outbox" not in plan, plan
        assert "Seq Scan on relay_events" not in plan, plan


def _plan(conn: psycopg.Connection, sql: bytes, params: dict[str, object]) -> str:
    rows = conn.execute(b"EXPLAIN " + sql, params).fetchall()
    return "\n".join(r[0] for r in rows)
