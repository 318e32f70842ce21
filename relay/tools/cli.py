"""``relay`` commands: parse, call, print. Errors become one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
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
    from relay.service import run_event_loop, serve

    _require_schema(settings)
    configure_logging(settings.log_format, settings.log_level)
    run_event_loop(
        serve(settings, dispatcher=not args.gateway_only, gateway=not args.dispatcher_only)
    )
    return 0


def _require_schema(settings: Settings) -> None:
    """A missing or outdated schema is one line and exit 2, before anything starts.
    An unreachable database is not: the relay waits for it (``/readyz`` says why)."""
    from relay.errors import DatabaseUnavailable
    from relay.migrate import require_current_schema

    with contextlib.suppress(DatabaseUnavailable):
        require_current_schema(settings.require_database_url())


def _config(args: argparse.Namespace, settings: Settings) -> int:
    shown = settings.masked()
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(len(k) for k in shown)
        for key, value in shown.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _schema(args: argparse.Namespace, _settings: Settings) -> int:
    """The event contracts, generated from the models (relay.events.schemas) and
    the routing table (relay.gateway.asyncapi)."""
    from pathlib import Path

    from relay.events.schemas import json_schema_files, write_json_schemas

    if args.json_schema is None and args.asyncapi is None:
        print("relay schema: nothing to write; give --json-schema DIR and/or --asyncapi FILE",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.json_schema is not None:
        directory = Path(args.json_schema)
        try:
            changed = write_json_schemas(directory)
        except OSError as exc:
            print(f"relay schema: cannot write {directory}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"{directory}: {len(json_schema_files())} JSON Schema file(s), {len(changed)} "
              "changed" + "".join(f"\n  {path}" for path in changed))  # fmt: skip
    if args.asyncapi is not None:
        return _write_asyncapi(args.asyncapi)
    return 0


def _write_asyncapi(target: str) -> int:
    """The AsyncAPI document to ``target`` (``-``: standard output)."""
    from pathlib import Path

    from relay.gateway.asyncapi import asyncapi_text

    text = asyncapi_text()
    if target == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"relay schema: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    document = json.loads(text)
    print(f"{target}: AsyncAPI {document['asyncapi']}, {len(document['channels'])} channels, "
          f"{len(document['components']['messages'])} messages")  # fmt: skip
    return 0


def _delegate(module: str) -> Handler:
    """Commands living in their own module expose ``run(args, settings) -> int``."""

    def handler(args: argparse.Namespace, settings: Settings) -> int:
        import importlib

        try:
            target = importlib.import_module(f"relay.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"relay.{module}":
                raise
            print(f"relay {args.command}: not implemented yet", file=sys.stderr)
            return 2
        code: int = target.run(args, settings)
        return code

    return handler


def _arguments(module: str, parser: argparse.ArgumentParser) -> None:
    """Let a command module declare its own flags (``add_arguments(parser)``)."""
    import importlib

    try:
        target = importlib.import_module(f"relay.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"relay.{module}":
            raise
        return
    adder = getattr(target, "add_arguments", None)
    if adder is not None:
        adder(parser)


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

    for name, module, text in (
        ("demo", "tools.demo", "embedded PostgreSQL, simulated orders and the dashboard"),
        ("status", "tools.status", "backlog, lag, dead letters, replicas and publishers"),
        ("dead-letters", "tools.deadletters", "list or retry dead-lettered events"),
        ("token", "tools.token", "mint a development token"),
        ("bench", "tools.bench", "benchmark the whole path against its ceilings"),
    ):
        p = sub.add_parser(name, help=text)
        _arguments(module, p)
        p.set_defaults(handler=_delegate(module))

    p = sub.add_parser("schema", help="write the event contracts generated from the models")
    p.add_argument(
        "--json-schema",
        metavar="DIR",
        help="one JSON Schema per event type and version: DIR/{eventType}/{version}.json",
    )
    p.add_argument(
        "--asyncapi",
        metavar="FILE",
        help="the AsyncAPI 3.0 document of every SSE stream and bus channel (- for stdout)",
    )
    p.set_defaults(handler=_schema)

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
