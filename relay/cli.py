"""``relay`` commands: parse, call, print. Errors become one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence

from relay.errors import RelayError
from relay.settings import Settings, load_settings

__all__ = ["main"]

Handler = Callable[[argparse.Namespace, Settings], int]


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from relay.db import describe
    from relay.migrate import migrate

    url = settings.require_database_url()
    applied = migrate(url)
    where = describe(url)
    if applied:
        print(f"applied {len(applied)} migration(s) to {where}: {', '.join(applied)}")
    else:
        print(f"{where} is up to date")
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from relay.logs import configure_logging
    from relay.service import serve

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve(settings, dispatcher=not args.gateway_only, gateway=not args.dispatcher_only))
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> int:
    shown = settings.masked()
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(len(k) for k in shown)
        for key, value in shown.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _not_yet(name: str) -> Handler:
    def handler(_args: argparse.Namespace, _settings: Settings) -> int:
        print(f"relay {name}: not implemented yet", file=sys.stderr)
        return 2

    return handler


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Transactional-outbox relay: PostgreSQL outbox -> Server-Sent Events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply database migrations (idempotent)")
    p.set_defaults(handler=_migrate)

    p = sub.add_parser("run", help="run the dispatcher and the HTTP gateway")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--dispatcher-only", action="store_true", help="no HTTP gateway")
    only.add_argument("--gateway-only", action="store_true", help="no dispatcher")
    p.set_defaults(handler=_run)

    p = sub.add_parser("demo", help="embedded PostgreSQL, simulated orders and the dashboard")
    p.set_defaults(handler=_not_yet("demo"))

    p = sub.add_parser("status", help="backlog, lag, dead letters and replicas")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_not_yet("status"))

    p = sub.add_parser("dead-letters", help="list or retry dead-lettered events")
    dl = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = dl.add_parser("list", help="list dead letters")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_not_yet("dead-letters list"))
    q = dl.add_parser("retry", help="re-validate and re-queue dead letters")
    q.add_argument("ids", nargs="*", type=int)
    q.add_argument("--all", action="store_true")
    q.set_defaults(handler=_not_yet("dead-letters retry"))

    p = sub.add_parser("token", help="mint a development token")
    p.set_defaults(handler=_not_yet("token"))

    p = sub.add_parser("bench", help="benchmark the whole path against its ceilings")
    p.set_defaults(handler=_not_yet("bench"))

    p = sub.add_parser("config", help="print the effective configuration, secrets masked")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        code: int = args.handler(args, settings)
        return code
    except RelayError as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
