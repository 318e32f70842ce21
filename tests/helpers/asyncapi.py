"""The AsyncAPI project's own parser (``@asyncapi/parser`` from npm), run with node.

``tests/asyncapi`` pins it (package.json + package-lock.json); the first use
installs it there with ``npm ci`` (node_modules is git-ignored). Without node
the caller's test skips, saying so; with node, any failure (npm, the network,
the parser) fails it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

__all__ = ["HARNESS", "errors", "parse_with_asyncapi_parser"]

HARNESS = Path(__file__).resolve().parents[1] / "asyncapi"
_INSTALLED = HARNESS / "node_modules" / "@asyncapi" / "parser" / "package.json"


def parse_with_asyncapi_parser(documents: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each document's report from ``validate.mjs`` (diagnostics, and the channels,
    operations and messages the parser understood), by name, in one node run."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AsyncAPI document is not checked with "
                    "@asyncapi/parser (install Node.js 18+ to run this test)")  # fmt: skip
    _install()
    with tempfile.TemporaryDirectory(prefix="relay-asyncapi-") as tmp:
        paths = {}
        for name, document in documents.items():
            paths[name] = Path(tmp) / f"{name}.json"
            paths[name].write_text(json.dumps(document), encoding="utf-8")
        run = subprocess.run(
            [node, "validate.mjs", *map(str, paths.values())],
            cwd=HARNESS, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    try:
        reports: dict[str, Any] = json.loads(run.stdout)
    except ValueError:
        raise AssertionError(f"validate.mjs failed (exit {run.returncode}): {run.stderr}") from None
    return {name: reports[str(path)] for name, path in paths.items()}


def errors(report: Mapping[str, Any]) -> list[str]:
    """The report's error-severity diagnostics, one line each."""
    return [
        f"{d['code']} at {d['path'] or '/'}: {d['message']}"
        for d in report["diagnostics"]
        if d["severity"] == "error"
    ]


def _install() -> None:
    """``npm ci`` into tests/asyncapi once (or when the pinned parser changed)."""
    with _locked():
        if _installed_version() == _pinned_version():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise AssertionError(
                "node is installed but npm is not: cannot install @asyncapi/parser"
            )
        run = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HARNESS, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert run.returncode == 0, f"npm ci in {HARNESS} failed:\n{run.stdout}{run.stderr}"


def _pinned_version() -> str:
    manifest = json.loads((HARNESS / "package.json").read_text())
    pinned: str = manifest["dependencies"]["@asyncapi/parser"]
    return pinned


def _installed_version() -> str | None:
    if not _INSTALLED.exists():
        return None
    installed: str = json.loads(_INSTALLED.read_text())["version"]
    return installed


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One installer at a time (parallel test processes share tests/asyncapi)."""
    lock = Path(tempfile.gettempdir()) / "relay-asyncapi-npm.lock"
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
