"""`relay status`: the first thing an operator runs when dashboards go quiet.

Reads only PostgreSQL, so it works with no relay running (zero replicas, a
growing backlog is then the answer).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from relay.db import connect
from relay.migrate import require_current_schema
from relay.settings import Settings
from relay.sql import query

__all__ = ["add_arguments", "collect", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def collect(database_url: str) -> dict[str, Any]:
    with connect(database_url, autocommit=True) as conn:
        backlog, oldest = conn.execute(query("status_outbox")).fetchone() or (0, None)
        published, lag_p50, lag_max, last_age = conn.execute(query("status_log")).fetchone() or (
            0, None, None, None,
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
            {"publisher": name, "lag_events": int(lag)}
            for name, lag in conn.execute(query("publisher_lag")).fetchall()
        ]
    return {
        "backlog": int(backlog),
        "oldest_pending_s": _number(oldest),
        "published_last_minute": int(published),
        "events_per_s_last_minute": round(int(published) / 60, 2),
        "publish_lag_p50_s": _number(lag_p50),
        "publish_lag_max_s": _number(lag_max),
        "last_publish_age_s": _number(last_age),
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
    oldest = report["oldest_pending_s"]
    print(f"oldest pending     {'-' if oldest is None else f'{oldest:.1f} s'}")
    print(f"published          {report['events_per_s_last_minute']} events/s (last minute)")
    lag = report["publish_lag_p50_s"]
    print(f"publish lag p50    {'-' if lag is None else f'{lag * 1000:.1f} ms'}")
    print(f"dead letters       {report['dead_letters']}")
    print(f"replicas           {len(report['replicas'])} live")
    for r in report["replicas"]:
        print(
            f"  {r['replica_id']:<28} {','.join(r['roles']):<20} "
            f"heartbeat {r['heartbeat_age_s']:.1f} s ago, {r['published']} published"
        )
    for p in report["publishers"]:
        print(f"publisher {p['publisher']}: {p['lag_events']} events behind")
    return 0
