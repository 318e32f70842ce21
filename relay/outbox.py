"""Producer side: write an event into ``relay_outbox`` inside the caller's transaction.

``enqueue`` never commits: the event becomes visible exactly when the order
change it describes commits, and vanishes with it on rollback. It validates
the event first, so a producer bug fails in the producer's transaction rather
than as a dead letter later.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, overload

import psycopg
import psycopg.pq

from relay.errors import InvalidPayload
from relay.events import Envelope, render
from relay.sql import query

__all__ = ["OutboxEvent", "aenqueue", "enqueue"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One outbox row as the producer writes it (SPEC §2)."""

    event_type: str
    payload: Mapping[str, Any]
    restaurant_id: uuid.UUID
    order_id: uuid.UUID | None = None
    customer_id: uuid.UUID | None = None
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    schema_version: int = 1
    occurred_on_utc: datetime = field(default_factory=_now)

    @classmethod
    def of(
        cls,
        event_type: str,
        payload: Mapping[str, Any],
        *,
        customer_id: uuid.UUID | None = None,
        event_id: uuid.UUID | None = None,
        schema_version: int = 1,
        occurred_on_utc: datetime | None = None,
    ) -> OutboxEvent:
        """Build an event taking restaurant and order ids from the payload."""
        restaurant = _key(payload, "restaurantId")
        if restaurant is None:
            raise InvalidPayload(f"{event_type}: restaurantId is required", field="restaurantId")
        order = _key(payload, "orderId")
        return cls(
            event_type=event_type,
            payload=payload,
            restaurant_id=_uuid(restaurant, "restaurantId", event_type),
            order_id=_uuid(order, "orderId", event_type) if order is not None else None,
            customer_id=customer_id,
            event_id=event_id or uuid.uuid4(),
            schema_version=schema_version,
            occurred_on_utc=occurred_on_utc or _now(),
        )

    def envelope(self) -> Envelope:
        return Envelope(
            event_id=str(self.event_id),
            event_type=self.event_type,
            schema_version=self.schema_version,
            restaurant_id=str(self.restaurant_id),
            order_id=None if self.order_id is None else str(self.order_id),
            customer_id=None if self.customer_id is None else str(self.customer_id),
            occurred_on_utc=self.occurred_on_utc,
            payload=self.payload,
        )


def _key(payload: Mapping[str, Any], camel: str) -> Any:
    return payload.get(camel, payload.get(camel[0].upper() + camel[1:]))


def _uuid(value: Any, name: str, event_type: str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise InvalidPayload(f"{event_type}: {name}: not a UUID", field=name) from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # money travels as an exact decimal string
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in an outbox payload")


def _params(event: OutboxEvent) -> dict[str, Any]:
    """Validate, then the insert's parameters: shared by every connection kind."""
    render(event.envelope())
    return {
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "restaurant_id": str(event.restaurant_id),
        "order_id": str(event.order_id) if event.order_id else None,
        "customer_id": str(event.customer_id) if event.customer_id else None,
        "payload": json.dumps(event.payload, default=_json_default, separators=(",", ":")),
        "occurred_on_utc": event.occurred_on_utc,
    }


_PSYCOPG_SQL = query("enqueue")
_SQLALCHEMY_SQL = re.sub(rb"%\((\w+)\)s", rb":\1", _PSYCOPG_SQL).decode()


def _refuse_autocommit(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise TypeError(
            "enqueue must join the caller's transaction: this psycopg connection is in "
            "autocommit mode outside a transaction block; use `with conn.transaction():`"
        )


@overload
def enqueue(conn: psycopg.AsyncConnection[Any], event: OutboxEvent) -> Awaitable[bool]: ...
@overload
def enqueue(conn: Any, event: OutboxEvent) -> bool | Awaitable[bool]: ...


def enqueue(conn: Any, event: OutboxEvent) -> bool | Awaitable[bool]:
    """Insert ``event`` in the caller's transaction; True if new, False if a duplicate.

    Accepts a psycopg ``Connection`` or ``AsyncConnection``, or a SQLAlchemy
    ``Session``, ``Connection``, ``AsyncSession`` or ``AsyncConnection``; for the
    async kinds the result must be awaited. Never commits.
    """
    if isinstance(conn, psycopg.AsyncConnection) or _is_sqlalchemy_async(conn):
        return aenqueue(conn, event)
    params = _params(event)
    if isinstance(conn, psycopg.Connection):
        _refuse_autocommit(conn)
        return conn.execute(_PSYCOPG_SQL, params).rowcount == 1
    if _is_sqlalchemy_sync(conn):
        from sqlalchemy import text

        return int(conn.execute(text(_SQLALCHEMY_SQL), params).rowcount) == 1
    raise TypeError(f"enqueue cannot use a {type(conn).__name__}: {_KINDS}")


async def aenqueue(conn: Any, event: OutboxEvent) -> bool:
    """The async form of :func:`enqueue` (psycopg or SQLAlchemy async)."""
    params = _params(event)
    if isinstance(conn, psycopg.AsyncConnection):
        _refuse_autocommit(conn)
        cursor = await conn.execute(_PSYCOPG_SQL, params)
        return cursor.rowcount == 1
    if _is_sqlalchemy_async(conn):
        from sqlalchemy import text

        result = await conn.execute(text(_SQLALCHEMY_SQL), params)
        return int(result.rowcount) == 1
    raise TypeError(f"aenqueue cannot use a {type(conn).__name__}: {_KINDS}")


_KINDS = (
    "pass a psycopg Connection/AsyncConnection or a SQLAlchemy "
    "Session/Connection/AsyncSession/AsyncConnection"
)


def _is_sqlalchemy_sync(conn: Any) -> bool:
    try:
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        return False
    return isinstance(conn, Session | Connection)


def _is_sqlalchemy_async(conn: Any) -> bool:
    try:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    except ImportError:  # pragma: no cover
        return False
    return isinstance(conn, AsyncSession | AsyncConnection)
