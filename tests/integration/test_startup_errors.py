"""Start-up errors a person can act on: a schema that does not match the code,
an optional client library that is not installed. One line that says what to
run or install, exit 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from relay.migrate import migrate, migrations
from tests.helpers.relay_process import RelayProcess

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def _relay(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], env={**os.environ, "DATABASE_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("command", [["run"], ["status"]])
def test_a_database_never_migrated_says_run_relay_migrate(
    empty_database_url: str, command: list[str]
) -> None:
    _one_line_exit_2(_relay(empty_database_url, *command), "schema is missing", "relay migrate")


@pytest.mark.parametrize("command", [["run"], ["status"]])
def test_a_schema_behind_the_code_names_what_is_pending(
    empty_database_url: str, tmp_path: Path, command: list[str]
) -> None:
    applied, pending = migrations()[:-1], migrations()[-1]
    for migration in applied:
        shutil.copy(MIGRATIONS / migration.name, tmp_path / migration.name)
    migrate(empty_database_url, tmp_path)
    _one_line_exit_2(
        _relay(empty_database_url, *command), "schema is behind", pending.name, "relay migrate"
    )


def test_a_schema_migrated_by_a_newer_relay_says_upgrade(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO relay_schema_migrations (name, checksum) VALUES ('9999_future', 'x')"
        )
    _one_line_exit_2(_relay(database_url, "status"), "newer relay", "9999_future")


# An install without the brokers extra: the client library cannot be imported.
_WITHOUT_AIO_PIKA = """
import sys
sys.modules["aio_pika"] = None
from relay.tools.cli import main
sys.exit(main(["run"]))
"""


def test_a_publisher_without_its_client_library_names_the_extra(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_AIO_PIKA],
        env={**os.environ, "DATABASE_URL": database_url, "RELAY_JWT_SECRET": "x" * 32,
             "RELAY_PUBLISHERS": "amqp://guest:s3cret@127.0.0.1:5672/"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    _one_line_exit_2(result, "RELAY_PUBLISHERS", "aio_pika", "pip install 'relay[brokers]'")
    assert "s3cret" not in result.stderr


def test_readyz_says_when_a_newer_relay_migrated_the_database(database_url: str) -> None:
    with RelayProcess(database_url) as relay:
        assert httpx.get(f"{relay.url}/readyz", timeout=10).status_code == 200
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO relay_schema_migrations (name, checksum) VALUES ('9999_future', 'x')"
            )
        response = httpx.get(f"{relay.url}/readyz", timeout=10)
    assert response.status_code == 503
    schema = response.json()["checks"]["schema"]
    assert schema["ok"] is False and "9999_future" in schema["problem"]


def test_a_bad_backplane_url_is_one_line_naming_the_variable(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "run", "--gateway-only"],
        env={**os.environ, "DATABASE_URL": database_url, "RELAY_JWT_SECRET": "x" * 32,
             "RELAY_BACKPLANE": "nats://user:s3cret@127.0.0.1:4222?strem=LIVE"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    _one_line_exit_2(result, "RELAY_BACKPLANE", "unknown option(s) strem")
    assert "s3cret" not in result.stderr
