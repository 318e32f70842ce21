"""Producers beside the relay as a sidecar really sits: on cores of their own.

On a shared 2-core box the relay's CPU competes with the producers for the
same cores, so "producers with the relay vs without" mixes two costs: what
the relay asks of the database, and the core it takes. Pinning PostgreSQL and
the producers to one core and the relay to the other separates them: what is
left of the producers' loss is the database's cost of the relay.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg

__all__ = ["cores", "move", "pinned", "postgres_pids"]


def cores() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def postgres_pids(url: str) -> list[int]:
    """The postmaster serving ``url`` and every process it has forked (local servers only)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    try:
        postmaster = _parent(int(row[0]))
    except OSError:
        return []  # not a process of this machine (a container, a remote server)
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _parent(int(entry.name)) == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


def _pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(pid, cpus)


@contextlib.contextmanager
def pinned(url: str, database_cpu: int) -> Iterator[bool]:
    """PostgreSQL (its postmaster, so every backend it forks from now on) and
    this process (so every worker it starts) on ``database_cpu``; all CPUs
    again afterwards. Yields whether PostgreSQL could be pinned (a server of
    another user, or in another container, cannot). Start the relay inside
    and move it with ``move``."""
    every = set(cores())
    pids = postgres_pids(url)
    _pin(pids, {database_cpu})
    os.sched_setaffinity(0, {database_cpu})
    try:
        isolated = bool(pids) and os.sched_getaffinity(pids[0]) == {database_cpu}
    except OSError:
        isolated = False
    try:
        yield isolated
    finally:
        os.sched_setaffinity(0, every)
        _pin(postgres_pids(url), every)


def move(pid: int, cpu: int) -> None:
    """Put a process (the relay) and every thread it has on ``cpu``; threads it
    starts later follow it."""
    threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if t.name.isdigit()]
    _pin(threads or [pid], {cpu})
