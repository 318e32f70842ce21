"""Run real `relay` processes for tests, and read their SSE streams over real HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SECRET = "test-secret-that-is-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RelayProcess:
    """One `relay run` subprocess; its output goes to a file the test can read."""

    database_url: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(
        default_factory=lambda: Path(tempfile.mkstemp(prefix="relay-", suffix=".log")[1])
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> RelayProcess:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "RELAY_JWT_SECRET": SECRET,
            "RELAY_LOG_LEVEL": "INFO",
            "RELAY_SHUTDOWN_GRACE": "3s",
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        gateway = "--dispatcher-only" not in self.args
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.output()}")
            if not gateway:
                # No HTTP to ask: started once it says so (its recorder then
                # takes the lease, or waits for it, on its own).
                if "relay started" in self.output() or time.monotonic() > deadline - timeout + 1.5:
                    return
            else:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                        return
            time.sleep(0.05)
        raise AssertionError(f"relay not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


@contextlib.contextmanager
def relay(database_url: str, *args: str, **env: str) -> Iterator[RelayProcess]:
    with RelayProcess(database_url, args, dict(env)) as proc:
        yield proc


@dataclass
class Frame:
    id: str | None
    event: str | None
    data: str

    def json(self) -> Any:
        import json

        return json.loads(self.data)


def parse_frames(buffer: str) -> tuple[list[Frame], list[str], str]:
    """Split SSE text into frames and comments; returns the unparsed tail."""
    frames: list[Frame] = []
    comments: list[str] = []
    normalized = buffer.replace("\r\n", "\n")
    *blocks, tail = normalized.split("\n\n")
    for block in blocks:
        fid: str | None = None
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("id:"):
                fid = line[3:].strip()
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if fid is not None or name is not None or data:
            frames.append(Frame(fid, name, "\n".join(data)))
    return frames, comments, tail
