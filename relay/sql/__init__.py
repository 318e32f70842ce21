"""Every query relay runs, named and commented in ``queries.sql``.

A DBA reviews all SQL in one file; code asks for a query by name. Queries are
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
    text = (Path(__file__).parent / "queries.sql").read_text()
    parts = _HEADER.split(text)
    found: dict[str, bytes] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise RuntimeError(f"query {name} is defined twice in queries.sql")
        found[name] = body.strip().encode()
    return found


def query(name: str) -> bytes:
    """The named query's text; KeyError names the query if it does not exist."""
    try:
        return _queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in relay/sql/queries.sql") from None
