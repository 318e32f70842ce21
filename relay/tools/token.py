"""``relay token``: mint a development token with the configured HS256 secret.

For trying the streams by hand (``curl -N``, the dashboard) and for tests.
Production tokens come from your identity provider; this command only knows
the shared secret, so it refuses to run without ``RELAY_JWT_SECRET``.
"""

from __future__ import annotations

import argparse
import uuid

from relay.errors import ConfigError
from relay.gateway.auth import mint_token
from relay.settings import Settings, parse_duration

__all__ = ["add_arguments", "run"]

_DEFAULT_SUBJECT = "relay-dev"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restaurant",
        action="append",
        default=[],
        metavar="ID",
        help="restaurant id the staff token grants (repeatable)",
    )
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--customer", metavar="ID", help="customer id: the token's sub, for /v1/orders streams"
    )
    who.add_argument(
        "--subject", metavar="SUB", help=f"the token's sub (default {_DEFAULT_SUBJECT})"
    )
    parser.add_argument(
        "--role", action="append", default=[], metavar="ROLE", help="a role claim (repeatable)"
    )
    parser.add_argument("--ttl", default="1h", help="lifetime, e.g. 90s, 15m, 1h (default 1h)")


def _uuid(value: str, flag: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not a UUID") from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print only the token, so ``TOKEN=$(relay token …)`` works."""
    if not settings.jwt_secret:
        raise ConfigError(
            "RELAY_JWT_SECRET is not set: `relay token` signs HS256 tokens with that shared "
            "secret (tokens for RELAY_JWT_JWKS keys come from your identity provider)"
        )
    restaurants = [_uuid(r, "--restaurant") for r in args.restaurant]
    customer = _uuid(args.customer, "--customer") if args.customer else None
    if not restaurants and customer is None and not args.role:
        raise ConfigError("nothing to grant: pass --restaurant ID, --customer ID or --role ROLE")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    if ttl.total_seconds() < 1:
        raise ConfigError(f"--ttl {args.ttl!r}: must be at least 1s")
    print(
        mint_token(
            settings.jwt_secret,
            subject=customer or args.subject or _DEFAULT_SUBJECT,
            restaurant_ids=restaurants,
            roles=args.role,
            ttl_seconds=int(ttl.total_seconds()),
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )
    return 0
