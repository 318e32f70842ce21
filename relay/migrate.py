"""Apply ``migrations/*.sql`` in order, once, safely from many processes.

Every applied file is recorded with its SHA-256; an applied file that was
edited afterwards is refused (a schema must never drift silently). All pending
files are applied in one transaction under an advisory lock, so two
``relay migrate`` run at once apply each migration exactly once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from relay.db import connect, describe
from relay.errors import MigrationError, MigrationTampered, SchemaNotCurrent

__all__ = ["Migration", "migrate", "migrations", "require_current_schema", "schema_problem"]

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x72656C6179  # "relay": the advisory lock serialising migrators


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str
    checksum: str


def _directory() -> Path:
    packaged = Path(__file__).parent / "_migrations"  # inside a built wheel
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "migrations"


def migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files in order; a misnamed or duplicate-numbered file is an error."""
    folder = directory or _directory()
    found: list[Migration] = []
    numbers: set[str] = set()
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_case.sql")
        if match.group(1) in numbers:
            raise MigrationError(f"{path.name}: migration number {match.group(1)} is used twice")
        numbers.add(match.group(1))
        data = path.read_bytes()
        found.append(Migration(path.name, data.decode(), hashlib.sha256(data).hexdigest()))
    if not found:
        raise MigrationError(f"no migrations found in {folder}")
    return found


def migrate(database_url: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    wanted = migrations(directory)
    with connect(database_url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS relay_schema_migrations (
                name       text        PRIMARY KEY,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = dict(
            conn.execute("SELECT name, checksum FROM relay_schema_migrations").fetchall()
        )
        known = {m.name for m in wanted}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(
                f"the database has migrations this relay does not know ({', '.join(unknown)}); "
                "it was migrated by a newer relay"
            )
        done: list[str] = []
        for migration in wanted:
            recorded = applied.get(migration.name)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationTampered(
                        f"{migration.name} was edited after it was applied "
                        f"(checksum {recorded[:12]}… in the database, {migration.checksum[:12]}… "
                        "on disk); restore the file and add a new migration instead"
                    )
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO relay_schema_migrations (name, checksum) VALUES (%s, %s)",
                (migration.name, migration.checksum),
            )
            done.append(migration.name)
        return done


def _compare(applied: set[str] | None) -> str | None:
    """What is wrong with a database whose applied migrations are ``applied``
    (None: relay never migrated it), or None when it matches this code."""
    expected = [m.name for m in migrations()]
    if applied is None:
        return "the relay schema is missing (relay migrate never ran); run `relay migrate`"
    newer = sorted(applied - set(expected))
    if newer:
        return (
            f"the schema was migrated by a newer relay ({', '.join(newer)} unknown to this "
            "version); upgrade this relay"
        )
    missing = [name for name in expected if name not in applied]
    if missing:
        latest = max(applied, default="none")
        return (
            f"the relay schema is behind: latest applied {latest}, this relay expects "
            f"{expected[-1]} ({len(missing)} pending: {', '.join(missing)}); run `relay migrate`"
        )
    return None


_APPLIED_TABLE = "SELECT to_regclass('relay_schema_migrations') IS NOT NULL"
_APPLIED = "SELECT name FROM relay_schema_migrations"


def require_current_schema(database_url: str) -> None:
    """Refuse to start on a database this code cannot use, in one line (exit 2)."""
    with connect(database_url, autocommit=True) as conn:
        applied: set[str] | None = None
        if conn.execute(_APPLIED_TABLE).fetchone() == (True,):
            applied = {str(row[0]) for row in conn.execute(_APPLIED)}
    problem = _compare(applied)
    if problem:
        raise SchemaNotCurrent(f"{describe(database_url)}: {problem}")


async def schema_problem(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """The same check for a running relay (``/readyz``): a newer relay may migrate
    the database under it."""
    applied: set[str] | None = None
    if await (await conn.execute(_APPLIED_TABLE)).fetchone() == (True,):
        applied = {str(row[0]) for row in await (await conn.execute(_APPLIED)).fetchall()}
    return _compare(applied)
