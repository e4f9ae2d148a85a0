"""A private PostgreSQL cluster that stops answering: every process of it SIGSTOPped, then SIGCONTed.

A paused server is the hard case of an outage: its sockets stay open and the kernel still accepts
new connections into the listen backlog, so nothing is refused and nothing is reset; only a
client-side timeout ends a wait on it. Never pause the shared server: use a ``PgCluster``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from tests.support.pg_cluster import PgCluster


def cluster_processes(pg: PgCluster) -> list[int]:
    """The postmaster and every process it forked (backends, checkpointer, WAL writer, ...)."""
    postmaster = pg.pid
    if postmaster is None:
        raise RuntimeError(f"{pg.name} is not running")
    found = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == postmaster:
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def paused(pg: PgCluster) -> Iterator[list[int]]:
    """SIGSTOP every process of ``pg`` for the block (yields their ids); SIGCONT them after, always."""
    postmaster = pg.pid
    assert postmaster is not None, f"{pg.name} is not running"
    os.kill(postmaster, signal.SIGSTOP)  # first: a stopped postmaster forks no new backend
    pids = cluster_processes(pg)
    _signal_all(pids, signal.SIGSTOP)
    try:
        yield pids
    finally:
        _signal_all(pids, signal.SIGCONT)
