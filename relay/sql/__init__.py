"""Every query relay runs, named and commented in ``relay/sql/*.sql``.

A DBA reviews all SQL in this folder (``queries.sql`` for the pipeline, one
file per further concern); code asks for a query by name. Queries are
returned as bytes, which psycopg accepts as a static query text.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

__all__ = ["query"]

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _queries() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for path in sorted(Path(__file__).parent.glob("*.sql")):
        parts = _HEADER.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"query {name} is defined twice ({path.name})")
            found[name] = body.strip().encode()
    return found


def query(name: str) -> bytes:
    """The named query's text; KeyError names the query if it does not exist."""
    try:
        return _queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in relay/sql/*.sql") from None
