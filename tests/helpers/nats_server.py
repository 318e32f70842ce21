"""A private NATS server with JetStream, which a test may restart or stop.

The backplane's fault tests restart NATS under running relays; the machine's
shared server (port 4222) must not be touched, so each test gets its own from
the local ``nats-server`` binary, its store in a temp dir that outlives a
restart (as a real deployment's volume does).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.relay_process import free_port

__all__ = ["NatsServer", "nats_server"]


class NatsServer:
    def __init__(self) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.skip("nats-server is not installed; install it (Debian: nats-server) "
                        "to run the backplane tests")  # fmt: skip
        self.binary = binary
        self.port = free_port()
        self.store = Path(tempfile.mkdtemp(prefix="relay-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nats-server did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the server (no graceful shutdown) and start it again on the same port and store."""
        self.stop()
        time.sleep(down_for)
        self.start()


@contextmanager
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.store, ignore_errors=True)
