"""Where the bench runs: a PostgreSQL server, fresh databases, relay and worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.gateway.auth import mint_token
from relay.migrate import migrate
from relay.tools.bench.workers import raise_fd_limit

__all__ = ["BackendCpu", "Bench", "RelayServer", "Worker", "stop_children"]

# Every relay and worker process the bench started and has not yet ended:
# an interrupted bench (SIGTERM, Ctrl-C) ends them instead of orphaning them.
_CHILDREN: set[subprocess.Popen[Any]] = set()


def stop_children() -> None:
    """Terminate the relay and worker processes still running, then reap them."""
    running = [proc for proc in _CHILDREN if proc.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    _CHILDREN.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bench:
    """One PostgreSQL server; each scenario gets a fresh database on it."""

    server_url: str
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The NATS server of the backplane scenario (RELAY_BACKPLANE); the
    # relays of the other scenarios never use it.
    backplane: str = ""

    def url_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.server_url)
        params["dbname"] = dbname
        return make_conninfo("", **params)

    @contextlib.contextmanager
    def database(self, *, migrated: bool = True) -> Iterator[str]:
        name = f"relay_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = self.url_for(name)
        try:
            if migrated:
                migrate(url)
            yield url
        finally:
            with psycopg.connect(self.server_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

    def token(self, restaurants: list[uuid.UUID]) -> str:
        return mint_token(
            self.secret, subject="bench", restaurant_ids=restaurants, ttl_seconds=6 * 3600
        )

    def machine(self) -> dict[str, Any]:
        with psycopg.connect(self.server_url) as conn:
            settings = {
                name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
                for name in (
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "shared_buffers",
                    "autovacuum",
                    "max_connections",
                )
            }
        return {"cores": os.cpu_count(), "python": sys.version.split()[0], "postgresql": settings}


def _proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a local process, None when it is not visible here."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU used by one database's PostgreSQL processes since construction.

    The relay's sessions (application_name ``relay …``), or with
    ``every_process`` every session of the database plus the server's
    background processes (WAL writer, checkpointer): what a workload costs the
    server. Processes are listed again at the end, so sessions opened meanwhile
    count from their start (one that exited meanwhile is missed). Readable only
    when the server runs on this machine; otherwise ``seconds`` is None.
    """

    def __init__(self, database_url: str, *, every_process: bool = False) -> None:
        self._url = database_url
        self._every = every_process
        self._start = self._sample()

    def _sample(self) -> dict[int, float] | None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND (datname = current_database()"
                "      AND (%(every)s OR application_name LIKE 'relay %%')"
                "      OR %(every)s AND datname IS NULL)",
                {"every": self._every},
            ).fetchall()
        cpu = {int(pid): _proc_cpu_seconds(int(pid)) for (pid,) in rows}
        visible = {pid: seconds for pid, seconds in cpu.items() if seconds is not None}
        return visible or None

    def seconds(self) -> float | None:
        """CPU seconds since construction (None when not measurable)."""
        now = self._sample()
        if now is None or self._start is None:
            return None
        return sum(seconds - self._start.get(pid, 0.0) for pid, seconds in now.items())


class RelayServer:
    """A real ``relay run`` process on a free port, with its CPU and RSS readable.

    ``args`` are ``relay run``'s (``--gateway-only``, ``--dispatcher-only``).
    RELAY_BACKPLANE is not inherited from the bench's environment: a scenario
    that measures the backplane passes it, and every other one measures the
    relay reading its tail from PostgreSQL, as its figures say.
    """

    def __init__(
        self, bench: Bench, database_url: str, *, args: Sequence[str] = (), **env: str
    ) -> None:
        self.port = _free_port()
        self.database_url = database_url
        self.http = "--dispatcher-only" not in args
        # A file, not a pipe: nobody reads it while the relay runs, and a full
        # pipe would stall the relay on its next log line.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        inherited = {k: v for k, v in os.environ.items() if k != "RELAY_BACKPLANE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run", *args],
            env={
                **inherited,
                "DATABASE_URL": database_url,
                "PORT": str(self.port),
                "HOST": "127.0.0.1",
                "RELAY_JWT_SECRET": bench.secret,
                "RELAY_LOG_LEVEL": "WARNING",
                **env,
            },
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            preexec_fn=raise_fd_limit,
        )
        _CHILDREN.add(self.proc)

    def wait_ready(self, timeout: float = 30) -> float:
        """Block until ``/readyz`` answers 200 (a relay without HTTP: until it
        has written its heartbeat row); returns that moment (monotonic)."""
        deadline = time.monotonic() + timeout
        if not self.http:
            return self._wait_heartbeat(deadline)
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(f"relay did not become ready: {self.output()[-2000:]}")

    def _wait_heartbeat(self, deadline: float) -> float:
        """Until this process's row is in ``relay_replicas``: its sessions are
        open and it runs (its recorder tries the lease meanwhile). One session
        for the polls: a connection each would take CPU from relays starting."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self._check_running()
                row = conn.execute(
                    "SELECT count(*) FROM relay_replicas WHERE pid = %s", (self.proc.pid,)
                ).fetchone()
                if row is not None and int(row[0]) > 0:
                    return time.monotonic()
                time.sleep(0.05)
        raise RuntimeError(f"relay wrote no heartbeat: {self.output()[-2000:]}")

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited {self.proc.returncode}: {self.output()[-2000:]}")

    def readiness(self) -> dict[str, Any]:
        """The checks of ``/readyz`` as the relay reports them now."""
        response = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5)
        checks: dict[str, Any] = response.json().get("checks", {})
        return checks

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of ``/metrics`` (counters and gauges), by name."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                samples[name] = float(value.split()[0])
        return samples

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid) or 0.0

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _CHILDREN.discard(self.proc)
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __enter__(self) -> RelayServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Worker:
    """A ``relay.tools.bench.workers`` process: started, waited for ``ready``, then its result."""

    def __init__(self, mode: str, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.tools.bench.workers", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _CHILDREN.add(self.proc)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")  # too big for argv with 10k streams
        self.proc.stdin.close()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.stdout.close()
            self.proc.wait(10)
            _CHILDREN.discard(self.proc)
            raise RuntimeError(f"bench worker failed to start (exit {self.proc.returncode})")

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM a worker that runs until told (a peer's queue worker), then its result."""
        if self.running():
            self.proc.terminate()
        return self.result(timeout)

    def result(self, timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdout is not None
        # From the buffered stream (wait_ready's readline may have read ahead
        # into the result), never from the raw pipe as communicate() does.
        with self.proc.stdout:
            out = self.proc.stdout.read()
        self.proc.wait(timeout)
        _CHILDREN.discard(self.proc)
        if self.proc.returncode != 0:
            raise RuntimeError(f"bench worker exited {self.proc.returncode}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
