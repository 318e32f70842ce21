"""Fixtures shared by every test: a real PostgreSQL and a fresh database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.tools.pgserver import ThrowawayPostgres
from tests.helpers.db import Databases, own_cluster, server


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    with server() as admin_url:
        dbs = Databases(admin_url)
        try:
            yield dbs
        finally:
            dbs.close()


@pytest.fixture
def database_url(databases: Databases) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    url = databases.create()
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture
def empty_database_url(databases: Databases) -> Iterator[str]:
    """A fresh database without relay's tables (for migration tests)."""
    url = databases.create(migrated=False)
    try:
        yield url
    finally:
        databases.drop(url)


@pytest.fixture
def cluster() -> Iterator[ThrowawayPostgres]:
    """A private, migrated cluster the test may restart or crash."""
    with own_cluster() as pg:
        yield pg
