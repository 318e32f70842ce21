"""The Starlette application: routes, auth checks, CORS, health and metrics.

Endpoints never parse tokens themselves: ``_principal`` asks the verifier and
turns its refusal into 401/403 with a ``WWW-Authenticate`` header.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from relay.errors import AuthError
from relay.gateway.auth import Principal, TokenVerifier, authenticate
from relay.gateway.hub import Hub
from relay.gateway.sse import EventStream
from relay.gateway.streams import (
    DATABASE_TROUBLE,
    StreamOptions,
    page,
    resolve_order,
    sse_global_stream,
    sse_restaurants_stream,
    sse_stream,
)
from relay.log import GLOBAL, Stream
from relay.metrics import REGISTRY, M

__all__ = ["GatewayConfig", "create_app"]

log = logging.getLogger("relay.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    stream: StreamOptions = field(default_factory=StreamOptions)
    cors_origins: tuple[str, ...] = ()
    max_connections: int = 0
    max_connections_per_subject: int = 0
    poll_limit_max: int = 1000
    # Restaurants one multi-restaurant stream may cover: each is a channel the
    # stream subscribes to and a range scan in every replay page.
    max_stream_restaurants: int = 100


Readiness = Callable[[], Awaitable[dict[str, Any]]]


def _problem(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _refused(exc: AuthError) -> JSONResponse:
    M.auth_failures.labels(reason=exc.reason).inc()
    if exc.status == 401:
        return _problem(401, str(exc), **{"WWW-Authenticate": 'Bearer realm="relay"'})
    return _problem(403, str(exc))


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


def _int_in(text: str, low: int, high: int) -> int | None:
    """``text`` as an integer from ``low`` to ``high`` (ASCII digits only), else None.

    The length is bounded before ``int()``: past 4,300 digits it raises instead
    of converting, and a client chooses how many digits it sends.
    """
    # isascii: str.isdigit() also accepts "²", which int() refuses.
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if low <= value <= high else None


def create_app(
    *,
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    verifier: TokenVerifier,
    config: GatewayConfig,
    readiness: Readiness,
) -> Starlette:
    open_per_subject: Tally[str] = Tally()

    async def principal(request: Request) -> Principal:
        return await authenticate(request, verifier)

    def capacity(subject: str) -> JSONResponse | None:
        if config.max_connections and hub.subscriber_count >= config.max_connections:
            return _problem(429, "too many open streams on this relay", **{"Retry-After": "5"})
        limit = config.max_connections_per_subject
        if limit and open_per_subject[subject] >= limit:
            return _problem(429, "too many open streams for this subject", **{"Retry-After": "5"})
        return None

    def respond(stream: Stream | frozenset[UUID], request: Request, who: Principal) -> Response:
        """Open ``stream``: one channel, or the kitchen streams of a set of restaurants."""
        cursor = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
        too_many = capacity(who.subject)
        if too_many is not None:
            return too_many
        open_per_subject[who.subject] += 1
        if isinstance(stream, frozenset):
            source = sse_restaurants_stream(
                hub, pool, stream, cursor, options=config.stream,
                expires_at=who.expires_at, subject=who.subject,
            )  # fmt: skip
        elif stream.partition == GLOBAL:
            source = sse_global_stream(
                hub, pool, stream.channel, cursor, options=config.stream,
                expires_at=who.expires_at, subject=who.subject,
            )  # fmt: skip
        else:
            source = sse_stream(
                hub, pool, stream, cursor, options=config.stream,
                expires_at=who.expires_at, subject=who.subject,
            )  # fmt: skip

        subject = who.subject  # not the whole principal: it lives as long as the stream

        def release() -> None:
            open_per_subject[subject] -= 1
            if open_per_subject[subject] <= 0:
                del open_per_subject[subject]

        return EventStream(
            source,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            send_timeout=config.stream.send_timeout,
            on_close=release,
        )

    async def restaurant_stream(request: Request) -> Response:
        restaurant = _uuid(request.path_params["restaurant_id"])
        if restaurant is None:
            return _problem(400, "restaurantId must be a UUID")
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        if not who.may_see_restaurant(restaurant):
            return _refused(
                AuthError("token does not grant this restaurant", status=403, reason="forbidden")
            )
        return respond(Stream.restaurant(restaurant), request, who)

    async def restaurants_stream(request: Request) -> Response:
        """Several restaurants' kitchen streams on one connection: the token's
        ``restaurant_ids``, or the ``?restaurant=`` subset of them."""
        most = config.max_stream_restaurants
        asked = request.query_params.getlist("restaurant")
        if len(asked) > most:
            return _problem(400, f"at most {most} restaurants per stream; got {len(asked)}")
        chosen = {_uuid(text) for text in asked}
        if None in chosen:
            return _problem(400, "every restaurant parameter must be a UUID")
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        if not asked:
            chosen = set(who.restaurant_ids)
        if not chosen:
            return _refused(AuthError("token grants no restaurant", status=403, reason="forbidden"))
        restaurants = frozenset(r for r in chosen if r is not None)
        if not restaurants <= who.restaurant_ids:
            return _refused(
                AuthError("token does not grant every restaurant asked for", status=403,
                          reason="forbidden")
            )  # fmt: skip
        if len(restaurants) > most:
            return _problem(
                400,
                f"the token grants {len(restaurants)} restaurants; a stream covers at most"
                f" {most}: choose them with ?restaurant=ID&restaurant=ID",
            )
        return respond(restaurants, request, who)

    async def order_stream(request: Request) -> Response:
        order = _uuid(request.path_params["order_id"])
        if order is None:
            return _problem(400, "orderId must be a UUID")
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        owner = await resolve_order(pool, order)
        allowed = owner is not None and (
            (owner[1] is not None and str(owner[1]) == who.subject)
            or who.may_see_restaurant(owner[0])
        )
        if owner is None or not allowed:
            return _refused(
                AuthError("token does not grant this order", status=403, reason="forbidden")
            )
        return respond(Stream.order(order, owner[0]), request, who)

    async def finance_stream(request: Request) -> Response:
        restaurant = _uuid(request.path_params["restaurant_id"])
        if restaurant is None:
            return _problem(400, "restaurantId must be a UUID")
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        if not (who.has_role("finance") and who.may_see_restaurant(restaurant)):
            return _refused(
                AuthError(
                    "finance streams need the finance role and the restaurant",
                    status=403,
                    reason="forbidden",
                )
            )
        return respond(Stream.finance(restaurant), request, who)

    async def admin_stream(request: Request) -> Response:
        return await _admin_only(request, "admin")

    async def coupon_stream(request: Request) -> Response:
        coupon = _uuid(request.path_params["coupon_id"])
        if coupon is None:
            return _problem(400, "couponId must be a UUID")
        return await _admin_only(request, f"coupon:{coupon}")

    async def _admin_only(request: Request, channel: str) -> Response:
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        if not who.has_role("admin"):
            return _refused(AuthError("this stream needs the admin role", status=403,
                                      reason="forbidden"))  # fmt: skip
        return respond(Stream.global_(channel), request, who)

    async def restaurant_events(request: Request) -> Response:
        restaurant = _uuid(request.path_params["restaurant_id"])
        if restaurant is None:
            return _problem(400, "restaurantId must be a UUID")
        try:
            who = await principal(request)
        except AuthError as exc:
            return _refused(exc)
        if not who.may_see_restaurant(restaurant):
            return _refused(
                AuthError("token does not grant this restaurant", status=403, reason="forbidden")
            )
        limit = _int_in(request.query_params.get("limit", "100"), 1, config.poll_limit_max)
        if limit is None:
            return _problem(400, f"limit must be an integer from 1 to {config.poll_limit_max}")
        body = await page(
            pool, Stream.restaurant(restaurant), request.query_params.get("after"), limit
        )
        return JSONResponse(body, headers={"Cache-Control": "no-cache"})

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        checks = await readiness()
        ok = all(
            v is True or v is None or (isinstance(v, dict) and v.get("ok", True))
            for v in checks.values()
        )
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def dashboard(_request: Request) -> Response:
        html = Path(__file__).with_name("dashboard.html")
        if not html.exists():
            return _problem(404, "dashboard not built")
        return HTMLResponse(html.read_text(), headers={"Cache-Control": "no-cache"})

    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_credentials=True,
                allow_methods=["GET"],
                allow_headers=["Authorization", "Last-Event-ID"],
            )
        )
    return Starlette(
        routes=[
            Route("/v1/restaurants/stream", restaurants_stream),
            Route("/v1/restaurants/{restaurant_id}/stream", restaurant_stream),
            Route("/v1/orders/{order_id}/stream", order_stream),
            Route("/v1/restaurants/{restaurant_id}/finance/stream", finance_stream),
            Route("/v1/admin/stream", admin_stream),
            Route("/v1/coupons/{coupon_id}/stream", coupon_stream),
            Route("/v1/restaurants/{restaurant_id}/events", restaurant_events),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/dashboard", dashboard),
        ],
        middleware=middleware,
        exception_handlers=dict.fromkeys(DATABASE_TROUBLE, _log_unavailable),
    )


async def _log_unavailable(_request: Request, exc: Exception) -> Response:
    """A request that needed the log while it could not be read: 503, retry soon."""
    log.warning("answered 503: the event log could not be read (%s)", type(exc).__name__)
    return _problem(503, "event log unavailable; retry shortly", **{"Retry-After": "2"})
