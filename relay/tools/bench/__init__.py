"""``relay bench``: the whole path against its ceilings, measured in one run.

Figures are ratios against ceilings measured moments before on the same
machine (which is shared and noisy), never absolute promises. Clients run in
their own processes. PostgreSQL is ``DATABASE_URL``'s server (a fresh
database per scenario) or a throwaway durable cluster (fsync on). The
backplane scenario uses ``RELAY_BACKPLANE``'s NATS server (default
nats://127.0.0.1:4222); no other scenario does.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

from relay.errors import ConfigError
from relay.settings import Settings

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: a ~1-minute smoke run (CI runs it, asserting no speed)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: "
        "drain,live,fanout,connections,history,replicas,producer,wal,peers,read_path,backplane",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON document")


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"relay bench — {report['machine']['cores']} cores, PostgreSQL "
        f"{report['machine']['postgresql']['server_version']}, {report['started']}"
    ]
    for name, figures in report["scenarios"].items():
        flat = ", ".join(f"{k}={v}" for k, v in figures.items() if not isinstance(v, dict))
        lines.append(f"  {name:<12} {flat}")
    return "\n".join(lines)


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from relay.tools.bench.env import Bench, stop_children
    from relay.tools.bench.scenarios import SCENARIOS, Sizes

    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ConfigError(
            f"--only: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    sizes = Sizes.quick() if args.quick else Sizes()
    failed: list[str] = []
    cluster = None
    # SIGTERM unwinds like Ctrl-C: relays, workers, databases and the cluster
    # are stopped on the way out instead of outliving the bench.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        url = settings.database_url
        if not url:
            from relay.tools.pgserver import ThrowawayPostgres

            cluster = ThrowawayPostgres(durable=True, settings={"max_connections": "200"})
            print("bench: starting a throwaway PostgreSQL (fsync on)…", file=sys.stderr)
            url = cluster.start()
        bench = Bench(url, backplane=settings.backplane)
        report: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": bool(args.quick),
            "machine": bench.machine(),
            "scenarios": {},
        }
        for name in chosen:
            began = time.monotonic()
            print(f"bench: {name}…", file=sys.stderr, flush=True)
            try:
                report["scenarios"][name] = SCENARIOS[name](bench, sizes)
            except Exception as exc:  # one broken scenario must not lose the others
                failed.append(name)
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            report["scenarios"][name]["bench_seconds"] = round(time.monotonic() - began, 1)
            if not args.json:
                print(
                    _table({**report, "scenarios": {name: report["scenarios"][name]}}).splitlines()[
                        -1
                    ],
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop_children()
        if cluster is not None:
            cluster.stop()
        signal.signal(signal.SIGTERM, previous)
    if not args.json:
        print(_table(report), file=sys.stderr)
    print(json.dumps(report, indent=None if args.json else 2))
    if failed:
        print(f"bench: scenario(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
