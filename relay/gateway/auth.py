"""JWT authentication: one verifier, used by every endpoint; endpoints never parse tokens.

Keys: an HS256 shared secret, and/or RS256/ES256 public keys from a JWKS file
or URL selected by ``kid`` (an unknown kid refetches the set once, rate
limited, so key rotation needs no restart). Algorithms are an allow-list per
key kind, so ``alg: none`` and RS256→HS256 key confusion never verify.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import jwt
from starlette.requests import Request

from relay.errors import AuthError, ConfigError

__all__ = [
    "AuthConfig",
    "Principal",
    "TokenVerifier",
    "authenticate",
    "mint_token",
    "redact_url",
    "token_from_request",
]

_ASYMMETRIC = ("RS256", "ES256")
_REFETCH_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    restaurant_ids: frozenset[UUID]
    roles: frozenset[str]
    expires_at: datetime

    def may_see_restaurant(self, restaurant_id: UUID) -> bool:
        return restaurant_id in self.restaurant_ids

    def has_role(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class AuthConfig:
    secret: str | None = None
    jwks: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: float = 30.0
    jwks_cache_seconds: float = 300.0
    cookie_name: str = "relay_token"


class TokenVerifier:
    """Verifies tokens into Principals; raises AuthError(401) with a bounded reason."""

    def __init__(self, config: AuthConfig) -> None:
        if not config.secret and not config.jwks:
            raise ConfigError(
                "no token key configured: set RELAY_JWT_SECRET (HS256) or RELAY_JWT_JWKS"
            )
        self.config = config
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._refetched_at = 0.0
        self._lock = asyncio.Lock()

    # -- keys -----------------------------------------------------------------

    def _is_url(self) -> bool:
        return bool(self.config.jwks and self.config.jwks.startswith(("http://", "https://")))

    def _parse_jwks(self, text: str) -> dict[str, jwt.PyJWK]:
        try:
            data = json.loads(text)
            keys = {}
            for index, entry in enumerate(data.get("keys", [])):
                key = jwt.PyJWK(entry)
                if key.algorithm_name not in _ASYMMETRIC:
                    continue
                keys[str(entry.get("kid", f"#{index}"))] = key
        except (ValueError, jwt.PyJWTError, AttributeError) as exc:
            raise ConfigError(f"RELAY_JWT_JWKS: not a usable JWKS document ({exc})") from None
        return keys

    def _load_file(self) -> None:
        assert self.config.jwks is not None
        try:
            text = Path(self.config.jwks).read_text()
        except OSError as exc:
            raise ConfigError(f"RELAY_JWT_JWKS: cannot read {self.config.jwks}: {exc}") from None
        self._keys = self._parse_jwks(text)
        self._fetched_at = time.monotonic()

    async def _fetch_url(self) -> None:
        assert self.config.jwks is not None
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(self.config.jwks)
            response.raise_for_status()
        self._keys = self._parse_jwks(response.text)
        self._fetched_at = time.monotonic()

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at > self.config.jwks_cache_seconds

    async def _key_for(self, kid: str | None) -> jwt.PyJWK:
        async with self._lock:
            if not self._keys or self._stale():
                await self._refresh()
            key = self._select(kid)
            if key is None and time.monotonic() - self._refetched_at > _REFETCH_EVERY:
                self._refetched_at = time.monotonic()
                await self._refresh()  # a new kid: the issuer may have rotated its keys
                key = self._select(kid)
        if key is None:
            raise AuthError("token signed with an unknown key", reason="unknown_kid")
        return key

    def _key_for_sync(self, kid: str | None) -> jwt.PyJWK:
        if self._is_url():
            raise ConfigError("a JWKS URL needs averify(), not verify()")
        if not self._keys or self._stale():
            self._load_file()
        key = self._select(kid)
        if key is None and time.monotonic() - self._refetched_at > _REFETCH_EVERY:
            self._refetched_at = time.monotonic()
            self._load_file()
            key = self._select(kid)
        if key is None:
            raise AuthError("token signed with an unknown key", reason="unknown_kid")
        return key

    async def _refresh(self) -> None:
        try:
            if self._is_url():
                await self._fetch_url()
            else:
                self._load_file()
        except httpx.HTTPError as exc:
            if not self._keys:
                raise AuthError(
                    f"cannot fetch the JWKS ({type(exc).__name__})", reason="unknown_kid"
                ) from None

    def _select(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    # -- verification ------------------------------------------------------------

    def _header(self, token: str) -> dict[str, Any]:
        """The token's header alone (``alg``, ``kid``): the decode that follows
        checks every segment. PyJWT's own reading of the header checks the
        whole token, character by character, so a large token (a hundred
        restaurants' ids) cost twice that on every connection."""
        segment = token.split(".", 1)[0]
        try:
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (ValueError, RecursionError):  # binascii's and UTF-8's errors are ValueErrors
            raise AuthError("malformed token", reason="malformed") from None
        if not isinstance(header, dict) or not isinstance(header.get("kid", ""), str):
            raise AuthError("malformed token", reason="malformed")
        return header

    def _route(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if alg == "HS256" and self.config.secret:
            return "HS256"
        if alg in _ASYMMETRIC and self.config.jwks:
            return str(alg)
        raise AuthError(f"algorithm {str(alg)[:10]!r} is not accepted", reason="bad_algorithm")

    def verify(self, token: str) -> Principal:
        header = self._header(token)
        alg = self._route(header)
        key: Any = self.config.secret if alg == "HS256" else self._key_for_sync(header.get("kid"))
        return self._decode(token, key, alg)

    async def averify(self, token: str) -> Principal:
        header = self._header(token)
        alg = self._route(header)
        key: Any = self.config.secret if alg == "HS256" else await self._key_for(header.get("kid"))
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: Any, alg: str) -> Principal:
        if isinstance(key, jwt.PyJWK):
            if key.algorithm_name != alg:
                raise AuthError("token algorithm does not match its key", reason="bad_algorithm")
            key = key.key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_seconds,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.config.audience is not None,
                    "verify_iss": self.config.issuer is not None,
                    # Checked by _times: PyJWT coerces with int(), so it takes
                    # true or "123" as a time and lets through an exp that no
                    # datetime can hold.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted", reason="bad_audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted", reason="bad_issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid", reason="bad_signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim", reason="bad_claims") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not accepted", reason="bad_algorithm") from None
        except jwt.DecodeError:
            raise AuthError("malformed token", reason="malformed") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token ({type(exc).__name__})", reason="bad_claims") from None
        return _principal(claims, _times(claims, self.config.leeway_seconds))


def _instant(value: object) -> datetime | None:
    """A NumericDate (a JSON number of seconds since the epoch) as a datetime,
    or None when it is not one: a string, a bool, inf/nan, or outside the
    years 1-9999 a datetime can hold (an exp in milliseconds, 10**20)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError):
        return None


def _times(claims: Mapping[str, Any], leeway: float) -> datetime:
    """Check exp, nbf and iat against the clock; returns the expiry.

    Runs after the signature verified, so a forged token learns nothing from
    these messages. Every refusal is a 401: an absurd time is a bad token,
    never a server error.
    """
    instants: dict[str, datetime] = {}
    for name in ("exp", "nbf", "iat"):
        if name in claims:
            instant = _instant(claims[name])
            if instant is None:
                raise AuthError(f"token {name} is not a valid time", reason="bad_claims")
            instants[name] = instant
    now = datetime.now(UTC)
    margin = timedelta(seconds=leeway)
    if instants["exp"] <= now - margin:
        raise AuthError("token expired", reason="expired")
    if "nbf" in instants and instants["nbf"] > now + margin:
        raise AuthError("token is not valid yet (nbf is in the future)", reason="bad_claims")
    if "iat" in instants and instants["iat"] > now + margin:
        raise AuthError("token is not valid yet (iat is in the future)", reason="bad_claims")
    return instants["exp"]


def _principal(claims: Mapping[str, Any], expires_at: datetime) -> Principal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("token sub must be a non-empty string", reason="bad_claims")
    restaurants: set[UUID] = set()
    raw = claims.get("restaurant_ids") or []
    if isinstance(raw, list):
        for item in raw:
            try:
                restaurants.add(UUID(str(item)))
            except ValueError:
                continue
    roles = claims.get("roles") or []
    return Principal(
        subject=subject,
        restaurant_ids=frozenset(restaurants),
        roles=frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset(),
        expires_at=expires_at,
    )


def token_from_request(
    headers: Mapping[str, str],
    query: Mapping[str, str],
    cookies: Mapping[str, str],
    cookie_name: str = "relay_token",
) -> str | None:
    """Bearer header, then ``?access_token=`` (EventSource sends no headers), then cookie."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("access_token") or cookies.get(cookie_name) or None


async def authenticate(request: Request, verifier: TokenVerifier) -> Principal:
    token = token_from_request(
        request.headers, request.query_params, request.cookies, verifier.config.cookie_name
    )
    if not token:
        raise AuthError("no token: send Authorization: Bearer, ?access_token= or a cookie",
                        reason="missing")  # fmt: skip
    return await verifier.averify(token)


def mint_token(
    secret: str,
    *,
    subject: str,
    restaurant_ids: Sequence[UUID | str] = (),
    roles: Sequence[str] = (),
    ttl_seconds: int = 3600,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for `relay token`, the demo and tests."""
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": subject,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(seconds=ttl_seconds)).timestamp()),
        "restaurant_ids": [str(r) for r in restaurant_ids],
    }
    if roles:
        claims["roles"] = list(roles)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def redact_url(url: str) -> str:
    """Mask token query parameters so a URL can be logged."""
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    masked = [(k, "***" if k in ("access_token", "token") else v) for k, v in pairs]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(masked, safe="*")))
