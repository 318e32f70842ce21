"""`relay migrate`: idempotent, concurrent-safe, tamper-evident, clear when unreachable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from relay.errors import MigrationTampered
from relay.migrate import migrate, migrations

ROOT = Path(__file__).resolve().parents[2]


def _relay(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _schema(url: str) -> list[tuple[str, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """
            SELECT table_name, column_name, data_type, is_nullable
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name LIKE 'relay\\_%'
            ORDER BY table_name, ordinal_position
            """
        ).fetchall()


def test_migration_files_are_numbered_and_named() -> None:
    names = [m.name for m in migrations()]
    assert names == sorted(names)
    assert [n[:4] for n in names] == [f"{i:04d}" for i in range(1, len(names) + 1)]


def test_migrate_twice_changes_nothing(empty_database_url: str) -> None:
    first = _relay("migrate", url=empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    before = _schema(empty_database_url)
    second = _relay("migrate", url=empty_database_url)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert _schema(empty_database_url) == before


def test_two_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relay", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("applied" in out for out, _ in outputs) == 1
    with psycopg.connect(empty_database_url) as conn:
        count = conn.execute("SELECT count(*) FROM relay_schema_migrations").fetchone()
    assert count == (len(migrations()),)


def test_schema_matches_the_contract(database_url: str) -> None:
    columns = {(t, c): (d, n) for t, c, d, n in _schema(database_url)}
    producer = {
        "event_id": ("uuid", "NO"),
        "event_type": ("text", "NO"),
        "schema_version": ("integer", "NO"),
        "restaurant_id": ("uuid", "NO"),
        "order_id": ("uuid", "YES"),
        "customer_id": ("uuid", "YES"),
        "payload": ("jsonb", "NO"),
        "occurred_on_utc": ("timestamp with time zone", "NO"),
    }
    for column, expected in producer.items():
        assert columns[("relay_outbox", column)] == expected, column
    # Every relay-owned column has a default, so the producer names only the contract columns.
    with psycopg.connect(database_url) as conn:
        without_default = conn.execute(
            """
            SELECT column_name FROM information_schema.columns
            WHERE table_name = 'relay_outbox' AND column_default IS NULL
              AND is_generated = 'NEVER' AND is_identity = 'NO' AND is_nullable = 'NO'
            """
        ).fetchall()
    assert {c for (c,) in without_default} <= set(producer)
    tables = {t for t, _ in columns}
    assert all(t.startswith("relay_") for t in tables)


def test_tampered_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", folder)
    migrate(empty_database_url, folder)
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationTampered, match=first.name):
        migrate(empty_database_url, folder)


def test_unreachable_database_is_one_clear_line() -> None:
    result = _relay("migrate", url="postgresql://relay:s3cret-pw@127.0.0.1:1/orders", timeout=30)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:1" in lines[0] and "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_missing_database_url_is_a_config_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
