"""`relay status` and `relay dead-letters` against a real database, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg

from relay.outbox import enqueue
from tests.helpers.orders import event, payload


def _relay(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], env={**os.environ, "DATABASE_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_status_without_a_running_relay_shows_the_backlog(database_url: str) -> None:
    restaurant = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        for _ in range(7):
            enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))
        conn.execute(
            "INSERT INTO relay_dead_letters (event_id, event_type, schema_version, restaurant_id,"
            " payload, occurred_on_utc, enqueued_at, reason)"
            " VALUES (gen_random_uuid(), 'X', 1, gen_random_uuid(), '{}', now(), now(), 'bad')"
        )
        for i, age in enumerate((2, 90)):
            conn.execute(
                "INSERT INTO relay_replicas (replica_id, hostname, pid, roles, heartbeat_at)"
                " VALUES (%s, 'h', 1, '{dispatcher,gateway}', now() - make_interval(secs => %s))",
                (f"replica-{i}", age),
            )
    result = _relay(database_url, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backlog"] == 7
    assert report["oldest_pending_s"] is not None and report["oldest_pending_s"] >= 0
    assert report["dead_letters"] == 1
    assert [r["replica_id"] for r in report["replicas"]] == ["replica-0"]  # the other is stale
    text = _relay(database_url, "status")
    assert "backlog            7 pending" in text.stdout


def test_status_with_unreachable_database_is_one_line() -> None:
    result = _relay("postgresql://u:pw@127.0.0.1:1/x", "status")
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1


def test_dead_letters_list_and_retry_after_fixing_the_row(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    bad = payload("OrderAccepted", restaurant_id=restaurant, order_id=order)
    bad["newStatus"] = "Preparing"
    still_bad = dict(bad)
    with psycopg.connect(database_url) as conn:
        for body in (bad, still_bad):
            conn.execute(
                "INSERT INTO relay_dead_letters (event_id, event_type, schema_version,"
                " restaurant_id, order_id, payload, occurred_on_utc, enqueued_at, reason)"
                " VALUES (gen_random_uuid(), 'OrderAccepted', 1, %s, %s, %s, now(), now(), 'x')",
                (restaurant, order, json.dumps(body)),
            )
        first, second = [
            r for (r,) in conn.execute("SELECT id FROM relay_dead_letters ORDER BY id")
        ]
        # The operator fixes the first row's payload.
        conn.execute(
            "UPDATE relay_dead_letters"
            " SET payload = jsonb_set(payload, '{newStatus}', '\"Accepted\"') WHERE id = %s",
            (first,),
        )
    listing = json.loads(_relay(database_url, "dead-letters", "list", "--json").stdout)
    assert [e["id"] for e in listing] == [first, second]
    result = _relay(database_url, "dead-letters", "retry", "--all")
    assert result.returncode == 1  # one still fails
    assert "re-queued 1" in result.stdout and "newStatus" in result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM relay_outbox").fetchone() == (1,)
        left = conn.execute("SELECT id, attempts FROM relay_dead_letters").fetchall()
    assert left == [(second, 2)]
    again = _relay(database_url, "dead-letters", "retry")
    assert again.returncode == 2 and "--all" in again.stderr


def test_bad_settings_are_one_line_with_exit_2() -> None:
    env = {**os.environ, "PORT": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "PORT" in result.stderr and "Traceback" not in result.stderr
    env = {**os.environ, "RELAY_RETENTION": "forever"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "RELAY_RETENTION" in result.stderr


def test_run_without_a_token_key_is_refused(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_JWT")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "run"], env={**env, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "RELAY_JWT_SECRET" in result.stderr and "RELAY_JWT_JWKS" in result.stderr


def test_config_masks_secrets() -> None:
    env = {
        **os.environ,
        "RELAY_JWT_SECRET": "super-secret-value-123",
        "DATABASE_URL": "postgresql://app:db-password-456@db.internal:5432/orders",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert "super-secret-value-123" not in result.stdout and "db-password-456" not in result.stdout
    assert "db.internal:5432" in result.stdout and "RELAY_JWT_SECRET" in result.stdout
