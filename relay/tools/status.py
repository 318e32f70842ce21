"""`relay status`: the first thing an operator runs when dashboards go quiet.

Reads only PostgreSQL, so it works with no relay running (zero replicas, a
growing backlog is then the answer).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from relay.db import connect
from relay.log import unrecorded_bounds
from relay.migrate import require_current_schema
from relay.settings import Settings
from relay.sql import query

__all__ = ["add_arguments", "collect", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def collect(database_url: str) -> dict[str, Any]:
    """What the relay has not yet passed on, how late it is, and who runs it.

    ``backlog`` counts the events not yet through the recorder: committed rows
    no window holds yet (``unrecorded``) plus the rows of windows its check
    has not passed (``unchecked_rows``). Lag is the age of the newest window
    and of the oldest unrecorded row.
    """
    with connect(database_url, autocommit=True) as conn:
        newest = conn.execute(query("newest_snapshot")).fetchone()
        unrecorded, oldest = (0, None)
        if newest:
            bounds = unrecorded_bounds(newest[0])
            found = conn.execute(query("backlog_unrecorded"), bounds, prepare=False).fetchone()
            unrecorded, oldest = found or (0, None)
        head, last_at, last_age, windows, rows = conn.execute(
            query("status_windows")
        ).fetchone() or (None, None, None, 0, 0)
        windowed, wait_p50, wait_max = conn.execute(query("status_last_minute")).fetchone() or (
            0, None, None,
        )  # fmt: skip
        dead = (conn.execute(query("status_dead_letters")).fetchone() or (0,))[0]
        replicas = [
            {
                "replica_id": r[0],
                "hostname": r[1],
                "pid": r[2],
                "roles": list(r[3]),
                "published": r[4],
                "heartbeat_age_s": _number(r[5]),
                "uptime_s": _number(r[6]),
            }
            for r in conn.execute(query("status_replicas")).fetchall()
        ]
        publishers = [
            {"publisher": name, "lag_windows": int(lag)}
            for name, lag in conn.execute(query("publisher_lag")).fetchall()
        ]
    return {
        "backlog": int(unrecorded) + int(rows),
        "unrecorded": int(unrecorded),
        "oldest_unrecorded_s": _number(oldest),
        "unchecked_windows": int(windows),
        "unchecked_rows": int(rows),
        "last_window": None if head is None else int(head),
        "last_window_at": None if last_at is None else last_at.isoformat(),
        "last_window_age_s": _number(last_age),
        "windowed_last_minute": int(windowed),
        "events_per_s_last_minute": round(int(windowed) / 60, 2),
        "window_lag_p50_s": _number(wait_p50),
        "window_lag_max_s": _number(wait_max),
        "dead_letters": int(dead),
        "replicas": replicas,
        "publishers": publishers,
    }


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.require_database_url()
    require_current_schema(url)  # a missing schema is one line, not a traceback
    report = collect(url)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"backlog            {report['backlog']} pending")
    print(
        f"  unrecorded       {report['unrecorded']} rows in no window yet, oldest "
        f"{_seconds(report['oldest_unrecorded_s'])}"
    )
    print(
        f"  unchecked        {report['unchecked_rows']} rows in "
        f"{report['unchecked_windows']} window(s) the check has not passed"
    )
    print(f"last window        {_seconds(report['last_window_age_s'])} ago")
    print(f"recorded           {report['events_per_s_last_minute']} events/s (last minute)")
    lag = report["window_lag_p50_s"]
    print(f"window lag p50     {'-' if lag is None else f'{lag * 1000:.1f} ms'}")
    print(f"dead letters       {report['dead_letters']}")
    print(f"replicas           {len(report['replicas'])} live")
    for r in report["replicas"]:
        print(
            f"  {r['replica_id']:<28} {','.join(r['roles']):<20} "
            f"heartbeat {r['heartbeat_age_s']:.1f} s ago, {r['published']} published"
        )
    for p in report["publishers"]:
        print(f"publisher {p['publisher']}: {p['lag_windows']} windows behind")
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
