"""Issue 6 over HTTP: metrics, readiness, logs without secrets, Procfile, image command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from relay.gateway.auth import mint_token
from relay.outbox import enqueue
from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.orders import INSERT_SQL, event, payload
from tests.helpers.relay_process import SECRET, RelayProcess, free_port
from tests.helpers.sse import Subscriber, bulk_accepted, client

ROOT = Path(__file__).resolve().parents[2]
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _labels), v in metrics.items() if n == name)


def test_metrics_count_what_happened_and_carry_no_ids(database_url: str) -> None:
    with RelayProcess(database_url) as relay:
        restaurant = uuid.uuid4()
        with psycopg.connect(database_url) as conn:
            for _ in range(5):
                enqueue(conn, event("OrderAccepted", restaurant_id=restaurant))  # 2 PII fields each
            bad = payload("OrderAccepted", restaurant_id=restaurant, order_id=uuid.uuid4())
            for kind in ("OrderAccepted", "NoSuchEvent"):
                conn.execute(INSERT_SQL, (uuid.uuid4(), kind, restaurant, None, None,
                                          json.dumps({**bad, "newStatus": "Nope"})))  # fmt: skip
        assert httpx.get(f"{relay.url}/v1/restaurants/{restaurant}/stream").status_code == 401
        forbidden = mint_token(SECRET, subject="s", restaurant_ids=[uuid.uuid4()])
        status = httpx.get(
            f"{relay.url}/v1/restaurants/{restaurant}/events",
            headers={"Authorization": f"Bearer {forbidden}"},
        ).status_code
        assert status == 403
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            metrics = _metrics(relay.url)
            if _total(metrics, "relay_checked_rows_total") >= 7:
                break
            time.sleep(0.2)
        assert _total(metrics, "relay_checked_rows_total") == 7
        assert _total(metrics, "relay_published_events_total") == 5
        assert _total(metrics, "relay_dead_lettered_events_total") == 2
        assert _total(metrics, "relay_dropped_fields_total") == 10
        assert metrics[("relay_auth_failures_total", (("reason", "missing"),))] == 1
        assert metrics[("relay_auth_failures_total", (("reason", "forbidden"),))] == 1
        labels = [value for (_n, pairs), _v in metrics.items() for _k, value in pairs]
        assert not any(UUID_RE.search(value) for value in labels)


def test_logs_are_json_and_never_carry_tokens_or_passwords(cluster: ThrowawayPostgres) -> None:
    url = cluster.dsn.replace("postgres@", "postgres:hunter2-db-pass@")
    relay = RelayProcess(url, env={"RELAY_LOG_FORMAT": "json", "RELAY_LOG_LEVEL": "DEBUG"})
    try:
        relay.start()
        restaurant = uuid.uuid4()
        wrong = mint_token("another-secret-another-secret-another", subject="x")
        expired = mint_token(SECRET, subject="x", restaurant_ids=[restaurant], ttl_seconds=-120)
        for tok in (wrong, expired, "not.a.token"):
            httpx.get(
                f"{relay.url}/v1/restaurants/{restaurant}/stream?access_token={tok}", timeout=5
            )
            httpx.get(
                f"{relay.url}/v1/restaurants/{restaurant}/events",
                headers={"Authorization": f"Bearer {tok}"}, timeout=5,
            )  # fmt: skip
        cluster.kill()  # a database outage
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if httpx.get(f"{relay.url}/readyz", timeout=5).status_code == 503:
                break
            time.sleep(0.2)
        assert httpx.get(f"{relay.url}/readyz", timeout=5).status_code == 503
        time.sleep(2)
        cluster.start_again()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if httpx.get(f"{relay.url}/readyz", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        assert httpx.get(f"{relay.url}/readyz", timeout=5).status_code == 200
        assert relay.stop() == 0
        output = relay.output()
        for secret in (wrong, expired, "not.a.token", "hunter2-db-pass", SECRET):
            assert secret not in output
        lines = [line for line in output.splitlines() if line.strip()]
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
        outages = [line for line in lines if "database unavailable" in line]
        assert 1 <= len(outages) <= 8  # one line per outage per component, not one per retry
    finally:
        relay.__exit__()


def test_procfile_release_then_relay_goes_ready(empty_database_url: str) -> None:
    entries = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    assert set(entries) == {"release", "relay"}
    port = free_port()
    env = {**os.environ, "DATABASE_URL": empty_database_url, "PORT": str(port),
           "RELAY_JWT_SECRET": SECRET}  # fmt: skip
    release = subprocess.run(
        [sys.executable, "-m", *shlex.split(entries["release"])], env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert release.returncode == 0, release.stderr
    proc = subprocess.Popen([sys.executable, "-m", *shlex.split(entries["relay"])], env=env)
    try:
        _wait_ok(f"http://127.0.0.1:{port}/readyz")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_image_command_serves_health_on_all_interfaces(database_url: str) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["relay", "run"]' in dockerfile and "HOST=0.0.0.0" in dockerfile
    healthcheck = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])\n", dockerfile)
    assert healthcheck is not None
    command = json.loads(healthcheck.group(1))  # the exec form is a JSON array
    assert command[:2] == ["python", "-c"]
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), "HOST": "0.0.0.0",
           "RELAY_JWT_SECRET": SECRET}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "relay", "run"], env=env)
    try:
        _wait_ok(f"http://127.0.0.1:{port}/healthz")
        check = subprocess.run([sys.executable, *command[1:]], env=env, timeout=10, check=False)
        assert check.returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _wait_ok(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def test_every_relay_session_is_named_and_runs_without_jit(database_url: str) -> None:
    # A DBA reading pg_stat_activity sees what each relay session is; and no
    # relay session (the gateway's pool included) JIT-compiles its queries.
    with RelayProcess(database_url) as relay:
        httpx.get(f"{relay.url}/readyz", timeout=5)
        with psycopg.connect(database_url) as conn:
            names = {
                name
                for (name,) in conn.execute(
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()
            }
    assert {"relay recorder", "relay gateway", "relay gateway pool", "relay sla"} <= names


async def test_relay_sessions_turn_jit_off_and_keep_a_configured_name(database_url: str) -> None:
    from relay.db import aconnect

    conn = await aconnect(database_url, autocommit=True, role="dispatcher")
    try:
        cur = await conn.execute(
            "SELECT current_setting('jit'), current_setting('application_name')"
        )
        assert await cur.fetchone() == ("off", "relay dispatcher")
    finally:
        await conn.close()
    named = database_url + ("&" if "?" in database_url else "?") + "application_name=orders-relay"
    conn = await aconnect(named, role="dispatcher")
    try:
        # Set up without leaving a transaction open on a non-autocommit connection.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() == ("orders-relay",)
    finally:
        await conn.close()


_LISTENERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'relay listener'
"""


def _listeners(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(_LISTENERS).fetchone()
    assert row is not None
    return int(row[0])


def _listener_check(relay: RelayProcess) -> object:
    return httpx.get(f"{relay.url}/readyz", timeout=5).json()["checks"]["listener"]


def _until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def test_only_a_gateway_beside_no_leading_recorder_listens_for_windows(
    database_url: str,
) -> None:
    """The leading recorder's process has every window in hand: its gateway
    holds no LISTEN session (the database would wake it for every window).
    A standby replica's gateway listens; when the leader dies the standby
    takes the lease, stops listening, and its streams go on receiving."""
    restaurant = uuid.uuid4()
    token = mint_token(SECRET, subject="staff", restaurant_ids=[restaurant])
    with RelayProcess(database_url) as leader:
        _until(lambda: _listeners(database_url) == 0, "no listener beside the leader")
        assert _listener_check(leader) is None
        assert "listening on relay_windows" not in leader.output()  # not even at start
        with RelayProcess(database_url) as standby:
            _until(lambda: _listeners(database_url) == 1, "the standby's listener")
            _until(lambda: _listener_check(standby) is True, "the standby to report it")
            assert "listening on relay_windows" in standby.output()
            async with client() as http:
                stream = Subscriber(
                    http, f"{standby.url}/v1/restaurants/{restaurant}/stream", token
                ).start()
                try:
                    await asyncio.wait_for(stream.ready.wait(), 10)
                    bulk_accepted(database_url, restaurant, 3)  # recorded by the leader
                    assert len(await stream.wait_for(3, timeout=10)) == 3
                    leader.kill()
                    _until(lambda: _listeners(database_url) == 0, "the standby to take over")
                    assert _listener_check(standby) is None
                    bulk_accepted(database_url, restaurant, 6)  # numbered B-1… again
                    events = await stream.wait_for(9, timeout=10)
                    numbers = [json.loads(e.data)["orderNumber"] for e in events]
                    assert numbers == [f"B-{n}" for n in (1, 2, 3, 1, 2, 3, 4, 5, 6)]
                finally:
                    await stream.close()
