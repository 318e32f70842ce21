"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.db import Databases
from tests.helpers.relay_process import RelayProcess


@pytest.fixture(scope="module")
def relay(databases: Databases) -> Iterator[RelayProcess]:
    """One relay process on a fresh database for a whole module (heartbeats
    every second); each test uses restaurants of its own."""
    url = databases.create()
    try:
        with RelayProcess(url, env={"RELAY_HEARTBEAT_SECONDS": "1"}) as proc:
            yield proc
    finally:
        databases.drop(url)
