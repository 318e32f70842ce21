"""`relay.outbox.enqueue` joins the caller's transaction, for every connection kind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from relay.errors import InvalidPayload
from relay.outbox import OutboxEvent, aenqueue, enqueue
from tests.helpers.orders import event, payload


def _rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    return int(row[0]) if row else -1


def _sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def _one(seed: uuid.UUID | None = None) -> OutboxEvent:
    return event("OrderAccepted", restaurant_id=uuid.uuid4(), order_id=seed)


# --- sync kinds: each yields (connection-like, commit, rollback) ------------------


def _psycopg(url: str) -> tuple[Any, Callable[[], None], Callable[[], None], Callable[[], None]]:
    conn = psycopg.connect(url)
    return conn, conn.commit, conn.rollback, conn.close


def _sa_session(url: str) -> tuple[Any, Callable[[], None], Callable[[], None], Callable[[], None]]:
    engine = create_engine(_sqlalchemy_url(url))
    session = Session(engine)

    def close() -> None:
        session.close()
        engine.dispose()

    return session, session.commit, session.rollback, close


def _sa_connection(
    url: str,
) -> tuple[Any, Callable[[], None], Callable[[], None], Callable[[], None]]:
    engine = create_engine(_sqlalchemy_url(url))
    conn = engine.connect()

    def close() -> None:
        conn.close()
        engine.dispose()

    return conn, conn.commit, conn.rollback, close


SYNC = [_psycopg, _sa_session, _sa_connection]


@pytest.mark.parametrize("kind", SYNC, ids=lambda k: k.__name__.strip("_"))
def test_sync_enqueue_commits_rolls_back_and_dedupes(database_url: str, kind: Any) -> None:
    conn, commit, rollback, close = kind(database_url)
    try:
        assert enqueue(conn, _one()) is True
        rollback()
        assert _rows(database_url) == 0  # rolled back: nothing
        same = _one()
        assert enqueue(conn, same) is True
        assert _rows(database_url) == 0  # not committed yet: never commits by itself
        commit()
        assert _rows(database_url) == 1
        assert enqueue(conn, same) is False  # the same event_id twice is a no-op
        commit()
        assert _rows(database_url) == 1
    finally:
        close()


async def _apsycopg(url: str) -> AsyncIterator[tuple[Any, Any, Any]]:
    conn = await psycopg.AsyncConnection.connect(url)
    yield conn, conn.commit, conn.rollback
    await conn.close()


async def _asa_session(url: str) -> AsyncIterator[tuple[Any, Any, Any]]:
    engine = create_async_engine(_sqlalchemy_url(url))
    async with AsyncSession(engine) as session:
        yield session, session.commit, session.rollback
    await engine.dispose()


async def _asa_connection(url: str) -> AsyncIterator[tuple[Any, Any, Any]]:
    engine = create_async_engine(_sqlalchemy_url(url))
    async with engine.connect() as conn:
        yield conn, conn.commit, conn.rollback
    await engine.dispose()


@pytest.mark.parametrize(
    "kind", [_apsycopg, _asa_session, _asa_connection], ids=lambda k: k.__name__.strip("_")
)
async def test_async_enqueue_commits_rolls_back_and_dedupes(database_url: str, kind: Any) -> None:
    async for conn, commit, rollback in kind(database_url):
        assert await enqueue(conn, _one()) is True
        await rollback()
        assert _rows(database_url) == 0
        same = _one()
        assert await aenqueue(conn, same) is True
        assert _rows(database_url) == 0
        await commit()
        assert _rows(database_url) == 1
        assert await enqueue(conn, same) is False
        await commit()
        assert _rows(database_url) == 1


def test_invalid_event_fails_in_the_producer_before_writing(database_url: str) -> None:
    restaurant, order = uuid.uuid4(), uuid.uuid4()
    bad = payload("OrderPreparing", restaurant_id=restaurant, order_id=order)
    bad["newStatus"] = "Accepted"
    with psycopg.connect(database_url) as conn:
        with pytest.raises(InvalidPayload, match="newStatus"):
            enqueue(conn, OutboxEvent.of("OrderPreparing", bad))
        float_total = payload("OrderPaymentSucceeded", restaurant_id=restaurant, order_id=order)
        float_total["total"] = 42.5
        with pytest.raises(InvalidPayload, match="total"):
            enqueue(conn, OutboxEvent.of("OrderPaymentSucceeded", float_total))
    assert _rows(database_url) == 0


def test_of_takes_routing_from_a_pascal_case_payload(database_url: str) -> None:
    restaurant, order, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    body = {k[0].upper() + k[1:]: v for k, v in
            payload("OrderAccepted", restaurant_id=restaurant, order_id=order).items()}  # fmt: skip
    item = OutboxEvent.of("OrderAccepted", body, customer_id=customer)
    assert (item.restaurant_id, item.order_id) == (restaurant, order)
    with psycopg.connect(database_url) as conn:
        enqueue(conn, item)
        conn.commit()
        row = conn.execute(
            "SELECT restaurant_id, order_id, customer_id FROM relay_outbox"
        ).fetchone()
    assert row == (restaurant, order, customer)


def test_autocommit_connection_outside_a_transaction_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(TypeError, match="transaction"):
            enqueue(conn, _one())
        with conn.transaction():
            assert enqueue(conn, _one()) is True
    assert _rows(database_url) == 1


def test_unsupported_connection_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="psycopg"):
        enqueue(object(), _one())
