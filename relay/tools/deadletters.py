"""`relay dead-letters list|retry`: inspect rows that failed validation, and re-queue them.

A retry re-validates the dead letter's columns (an operator may have fixed
them) with the current models, as every reader of the log validates a row.
One that now passes replaces its rejected original in the outbox: the
original is deleted and the event inserted again under its own event id (so
it stays idempotent), with a new id and transaction, so it lands in a later
window and every reader sees it once, there. If retention already removed
the original, the dead letter alone brings it back. One that still fails
keeps its place with the new reason and one more attempt.
"""

from __future__ import annotations

import argparse
import json
import sys

from relay.db import connect
from relay.errors import ConfigError, ContractError, clip
from relay.events.stored import MAX_REASON, render_stored
from relay.settings import Settings
from relay.sql import query

__all__ = ["add_arguments", "retry", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list dead letters")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--limit", type=int, default=100)
    again = actions.add_parser("retry", help="re-validate and re-queue dead letters")
    again.add_argument("ids", nargs="*", type=int, metavar="ID")
    again.add_argument("--all", action="store_true", help="every dead letter")


def retry(database_url: str, ids: list[int], *, everything: bool = False) -> tuple[int, list[str]]:
    """Re-queue what now validates; returns (re-queued count, reasons still failing)."""
    requeued, failing = 0, []
    with connect(database_url) as conn, conn.transaction():
        rows = conn.execute(query("dead_letters_take"), {"all": everything, "ids": ids}).fetchall()
        for row_id, *columns, derived in rows:
            try:
                render_stored(*columns, derived=derived)
            except ContractError as exc:
                reason = clip(str(exc), MAX_REASON)
                conn.execute(query("dead_letters_still_bad"), {"id": row_id, "reason": reason})
                failing.append(f"#{row_id} {columns[0]}: {reason}")
                continue
            conn.execute(query("dead_letters_unqueue"), {"id": row_id})
            conn.execute(query("dead_letters_requeue"), {"id": row_id, "derived": derived})
            requeued += 1
    return requeued, failing


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.require_database_url()
    if args.action == "list":
        with connect(url) as conn:
            rows = conn.execute(query("dead_letters_list"), {"limit": args.limit}).fetchall()
        entries = [
            {
                "id": r[0],
                "event_id": str(r[1]),
                "event_type": clip(r[2]),  # a producer's megabyte type is not a megabyte line
                "schema_version": r[3],
                "restaurant_id": str(r[4]),
                "reason": r[5],
                "dead_lettered_at": r[6].isoformat(),
                "attempts": r[7],
            }
            for r in rows
        ]
        if args.json:
            print(json.dumps(entries, indent=2))
        elif not entries:
            print("no dead letters")
        else:
            for e in entries:
                print(
                    f"#{e['id']:<6} {e['event_type']} v{e['schema_version']}  {e['event_id']}  "
                    f"attempts={e['attempts']}\n        {e['reason']}"
                )
        return 0
    if not args.ids and not args.all:
        raise ConfigError("dead-letters retry needs IDs or --all")
    requeued, failing = retry(url, args.ids, everything=args.all)
    print(f"re-queued {requeued} dead letter(s)")
    for line in failing:
        print(f"still invalid: {line}", file=sys.stderr)
    return 1 if failing else 0
