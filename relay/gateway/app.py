"""The Starlette application: routes, auth checks, CORS, health and metrics.

Each route declares its access once (``Access``: what the request names, what
the token must grant); one wrapper, ``guarded``, applies it, so endpoints never
parse tokens or refuse requests themselves.
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

from relay.errors import AuthError, UnknownEventType
from relay.events.schemas import contract_for, contracts
from relay.gateway.asyncapi import asyncapi_document
from relay.gateway.auth import Principal, TokenVerifier, authenticate
from relay.gateway.hub import Hub
from relay.gateway.sse import EventStream, OpenStreams
from relay.gateway.streams import (
    DATABASE_TROUBLE,
    CustomerOrders,
    RestaurantSet,
    StreamOptions,
    Target,
    page,
    resolve_order,
    sse,
)
from relay.log import Stream
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


class BadRequest(Exception):
    """What a request names is malformed (400): said before the token is read."""


def _forbidden(message: str) -> AuthError:
    return AuthError(message, status=403, reason="forbidden")


def _path_uuid(request: Request, name: str, label: str) -> UUID:
    try:
        return UUID(request.path_params[name])
    except ValueError:
        raise BadRequest(f"{label} must be a UUID") from None


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


@dataclass(frozen=True)
class Access:
    """Who may open a route, declared once per route (in the spirit of
    Starlette's ``requires``): ``names`` reads what the request asks for
    (BadRequest, 400, before any token is read), ``grants`` checks it against
    the verified principal and returns what to open (AuthError 403 if not)."""

    names: Callable[[Request], Any]
    grants: Callable[[Principal, Any], Awaitable[Target]]


def _nothing(_request: Request) -> None:
    return None


def _restaurant(request: Request) -> UUID:
    return _path_uuid(request, "restaurant_id", "restaurantId")


async def _staff(who: Principal, restaurant: UUID) -> Target:
    if not who.may_see_restaurant(restaurant):
        raise _forbidden("token does not grant this restaurant")
    return Stream.restaurant(restaurant)


async def _finance(who: Principal, restaurant: UUID) -> Target:
    if not (who.has_role("finance") and who.may_see_restaurant(restaurant)):
        raise _forbidden("finance streams need the finance role and the restaurant")
    return Stream.finance(restaurant)


def _admin_of(channel: Callable[[Any], str]) -> Callable[[Principal, Any], Awaitable[Target]]:
    async def grants(who: Principal, named: Any) -> Target:
        if not who.has_role("admin"):
            raise _forbidden("this stream needs the admin role")
        return Stream.global_(channel(named))

    return grants


async def _customer(who: Principal, _named: None) -> Target:
    try:
        return CustomerOrders(UUID(who.subject))
    except ValueError:
        raise _forbidden("the token's subject is not a customer id (a UUID)") from None


def _restaurant_set(most: int) -> Access:
    """The token's ``restaurant_ids``, or the ``?restaurant=`` subset of them."""

    def names(request: Request) -> frozenset[UUID]:
        asked = request.query_params.getlist("restaurant")
        if len(asked) > most:
            raise BadRequest(f"at most {most} restaurants per stream; got {len(asked)}")
        try:
            return frozenset(UUID(text) for text in asked)
        except ValueError:
            raise BadRequest("every restaurant parameter must be a UUID") from None

    async def grants(who: Principal, asked: frozenset[UUID]) -> Target:
        restaurants = asked or frozenset(who.restaurant_ids)
        if not restaurants:
            raise _forbidden("token grants no restaurant")
        if not restaurants <= who.restaurant_ids:
            raise _forbidden("token does not grant every restaurant asked for")
        if len(restaurants) > most:
            raise BadRequest(
                f"the token grants {len(restaurants)} restaurants; a stream covers at most"
                f" {most}: choose them with ?restaurant=ID&restaurant=ID"
            )
        return RestaurantSet(restaurants)

    return Access(names, grants)


def create_app(
    *,
    hub: Hub,
    pool: AsyncConnectionPool[Any],
    verifier: TokenVerifier,
    config: GatewayConfig,
    readiness: Readiness,
) -> Starlette:
    open_per_subject: Tally[str] = Tally()
    open_streams = OpenStreams()

    async def order_owner(who: Principal, order: UUID) -> Target:
        owner = await resolve_order(pool, order)
        if owner is None:
            raise _forbidden("token does not grant this order")
        restaurant, customer = owner
        if not (
            (customer is not None and str(customer) == who.subject)
            or who.may_see_restaurant(restaurant)
        ):
            raise _forbidden("token does not grant this order")
        return Stream.order(order, restaurant)

    staff = Access(_restaurant, _staff)
    streams = {
        "/v1/restaurants/stream": _restaurant_set(config.max_stream_restaurants),
        "/v1/restaurants/{restaurant_id}/stream": staff,
        "/v1/orders/{order_id}/stream": Access(
            lambda r: _path_uuid(r, "order_id", "orderId"), order_owner
        ),
        "/v1/me/orders/stream": Access(_nothing, _customer),
        "/v1/restaurants/{restaurant_id}/finance/stream": Access(_restaurant, _finance),
        "/v1/admin/stream": Access(_nothing, _admin_of(lambda _named: "admin")),
        "/v1/coupons/{coupon_id}/stream": Access(
            lambda r: _path_uuid(r, "coupon_id", "couponId"),
            _admin_of(lambda coupon: f"coupon:{coupon}"),
        ),
    }

    def guarded(
        access: Access, then: Callable[[Request, Principal, Target], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint that answers only once ``access`` holds: 400, 401 or 403 otherwise."""

        async def endpoint(request: Request) -> Response:
            try:
                named = access.names(request)
                who = await authenticate(request, verifier)
                target = await access.grants(who, named)
            except BadRequest as exc:
                return _problem(400, str(exc))
            except AuthError as exc:
                return _refused(exc)
            return await then(request, who, target)

        return endpoint

    def capacity(subject: str) -> JSONResponse | None:
        if config.max_connections and hub.subscriber_count >= config.max_connections:
            return _problem(429, "too many open streams on this relay", **{"Retry-After": "5"})
        limit = config.max_connections_per_subject
        if limit and open_per_subject[subject] >= limit:
            return _problem(429, "too many open streams for this subject", **{"Retry-After": "5"})
        return None

    async def open_stream(request: Request, who: Principal, target: Target) -> Response:
        cursor = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
        too_many = capacity(who.subject)
        if too_many is not None:
            return too_many
        subject = who.subject  # not the whole principal: it lives as long as the stream
        open_per_subject[subject] += 1

        def release() -> None:
            open_per_subject[subject] -= 1
            if open_per_subject[subject] <= 0:
                del open_per_subject[subject]

        source = sse(
            hub, pool, target, cursor, options=config.stream,
            expires_at=who.expires_at, subject=subject,
        )  # fmt: skip
        return EventStream(
            source,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            send_timeout=config.stream.send_timeout,
            on_close=release,
            registry=open_streams,
        )

    async def poll(request: Request, _who: Principal, target: Target) -> Response:
        assert isinstance(target, Stream)
        limit = _int_in(request.query_params.get("limit", "100"), 1, config.poll_limit_max)
        if limit is None:
            return _problem(400, f"limit must be an integer from 1 to {config.poll_limit_max}")
        body = await page(pool, target, request.query_params.get("after"), limit)
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

    async def schema_index(_request: Request) -> Response:
        """The event contracts other teams consume: public, no PII, no token."""
        listed = [
            {"eventType": c.event_type, "schemaVersion": c.schema_version,
             "id": c.schema_id, "url": f"/v1/schemas/{c.path}"}
            for c in contracts()
        ]  # fmt: skip
        return JSONResponse({"schemas": listed}, headers={"Cache-Control": "public, max-age=300"})

    async def schema(request: Request) -> Response:
        try:
            contract = contract_for(
                request.path_params["event_type"], request.path_params["version"]
            )
        except UnknownEventType as exc:
            return _problem(404, str(exc))
        return Response(
            contract.schema_text,
            media_type="application/schema+json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    async def asyncapi(request: Request) -> Response:
        """Every stream and bus channel as AsyncAPI 3.0, its gateway server where
        this request reached it (a proxy's Host header when it passes one)."""
        document = asyncapi_document(gateway=request.url.netloc, protocol=request.url.scheme)
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=300"})

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
    app = Starlette(
        routes=[
            *(Route(path, guarded(access, open_stream)) for path, access in streams.items()),
            Route("/v1/restaurants/{restaurant_id}/events", guarded(staff, poll)),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/v1/schemas", schema_index),
            Route("/v1/schemas/{event_type}/{version:int}.json", schema),
            Route("/asyncapi.json", asyncapi),
            Route("/dashboard", dashboard),
        ],
        middleware=middleware,
        exception_handlers=dict.fromkeys(DATABASE_TROUBLE, _log_unavailable),
    )
    app.state.open_streams = open_streams  # for shutdown: see OpenStreams.hurry
    return app


async def _log_unavailable(_request: Request, exc: Exception) -> Response:
    """A request that needed the log while it could not be read: 503, retry soon."""
    log.warning("answered 503: the event log could not be read (%s)", type(exc).__name__)
    return _problem(503, "event log unavailable; retry shortly", **{"Retry-After": "2"})
