"""A private PostgreSQL cluster (and streaming replicas of it) for tests that stop, restart or pause it.

The shared server at 5432 must never be stopped by a test; this one is the test's own: ``initdb``
into a temporary directory, served on a free port of 127.0.0.1 with its Unix socket inside that
directory, ``trust`` authentication, superuser ``postgres``. ``replica()`` makes a hot standby with
``pg_basebackup -R`` (streaming, on another free port) that follows the primary.

PostgreSQL refuses to run as root; when the tests run as root the binaries run as the ``postgres``
system user and the directory is handed to it. ``stop``/``restart`` come back on the SAME port,
the way a real database returns after an outage. Use it as a context manager: ``cleanup()``
stops the servers (immediate mode) and removes their files whatever happened.

    with PgCluster() as primary, primary.replica() as standby:
        primary.url("postgres"), standby.url("postgres")
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

from tests.support.services import in_ci
from tests.support.smtp import free_port

HOST = "127.0.0.1"
SUPERUSER = "postgres"
StopMode = Literal["smart", "fast", "immediate"]

# Small and quick: tests start several clusters. fsync=off costs nothing here (the OS keeps what a
# stopped server wrote) and makes initdb, checkpoints and pg_basebackup fast.
_SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "shared_buffers": "'16MB'",
    "max_connections": "60",
    "fsync": "off",
    "full_page_writes": "off",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "'64MB'",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "'1s'",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


def _bindir() -> Path | None:
    explicit = os.environ.get("ATRIUM_TEST_PG_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_basebackup", "postgres")):
            return directory
    return None


def _system_user() -> str | None:
    """The user the server runs as: ``postgres`` when we are root (the server refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def pg_cluster_available() -> bool:
    return _bindir() is not None and (os.geteuid() != 0 or _system_user() is not None)


def require_pg_cluster() -> None:
    """Skip (locally) or fail (under CI=true) when private clusters cannot be made here."""
    if pg_cluster_available():
        return
    message = "initdb/pg_ctl/pg_basebackup (and, as root, a postgres system user) are needed"
    if in_ci():
        pytest.fail(f"{message}; CI requires them", pytrace=False)
    pytest.skip(message)


class PgClusterError(RuntimeError):
    pass


class PgCluster:
    """One private PostgreSQL server: ``init()`` (or ``replica()`` of another), ``start``/``stop``."""

    def __init__(self, name: str = "primary", *, base: Path | None = None, port: int | None = None) -> None:
        bindir = _bindir()
        if bindir is None:
            raise PgClusterError("PostgreSQL server binaries not found (set ATRIUM_TEST_PG_BINDIR)")
        self.bindir = bindir
        self.name = name
        self.port = port or free_port(HOST)
        self._user = _system_user()
        self._owns_base = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix=f"atrium-pg-{name}-"))
        self.datadir = self.base / "data"
        self.logfile = self.base / "server.log"
        self._replicas: list[PgCluster] = []
        self._hand_over(self.base)

    # --- addresses ------------------------------------------------------------------------------

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """For asyncpg.connect / psql."""
        return self.url(database, driver="postgresql")

    # --- lifecycle -----------------------------------------------------------------------------

    def init(self) -> PgCluster:
        """``initdb`` a fresh cluster (trust authentication, replication allowed from 127.0.0.1)."""
        self._run("initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# atrium tests\n" + "".join(f"{k} = {v}\n" for k, v in _SETTINGS.items()))
        return self

    def start(self, timeout: float = 30.0) -> PgCluster:
        """Start and wait until it accepts connections (a standby: until it is a hot standby)."""
        if self.running:
            return self
        options = f"-p {self.port} -k {self.base} -c listen_addresses={HOST}"
        self._run("pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options,
                  "-w", "-t", str(int(timeout)), check_log=True)
        self.wait_ready(timeout)
        return self

    def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Stop and wait: once this returns, connections to the port are refused."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)),
                  check_log=True)

    def restart(self, mode: StopMode = "fast", timeout: float = 30.0) -> PgCluster:
        """``pg_ctl restart``: one command, the gap is as short as PostgreSQL makes it."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses={HOST}"
        self._run("pg_ctl", "restart", "-D", str(self.datadir), "-l", str(self.logfile), "-m", mode,
                  "-o", options, "-w", "-t", str(int(timeout)), check_log=True)
        self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, from ``postmaster.pid`` (None when not running)."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def accepts_connections(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        probe = subprocess.run(
            [str(self.bindir / "pg_ctl"), "status", "-D", str(self.datadir)], capture_output=True,
            **self._as_owner(),
        )
        return probe.returncode == 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a client can log in and run a query (``pg_isready`` when present, else a socket probe)."""
        deadline = time.monotonic() + timeout
        isready = self.bindir / "pg_isready"
        while True:
            if isready.is_file():
                probe = subprocess.run([str(isready), "-h", HOST, "-p", str(self.port), "-U", SUPERUSER,
                                        "-d", "postgres", "-t", "1"], capture_output=True)
                if probe.returncode == 0:
                    return
            elif self.accepts_connections():
                return
            if time.monotonic() > deadline:
                raise PgClusterError(f"{self.name} not ready on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)

    # --- replication -------------------------------------------------------------------------

    def replica(self, name: str = "replica", *, start: bool = True, timeout: float = 60.0) -> PgCluster:
        """A hot standby of this (running) cluster: ``pg_basebackup -R -X stream`` on another free port.

        It streams from this server with ``primary_conninfo`` written by ``-R`` and serves read-only
        queries (``pg_is_in_recovery()`` is true). Cleaned up with this cluster too.
        """
        standby = PgCluster(name)
        self._replicas.append(standby)
        standby._run("pg_basebackup", "-h", HOST, "-p", str(self.port), "-U", SUPERUSER,
                     "-D", str(standby.datadir), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
                     timeout=timeout)
        if start:
            standby.start(timeout)
        return standby

    # --- queries (asyncpg, a connection per call: fine for tests) ----------------------------

    async def fetchval(self, sql: str, *args: Any, database: str = "postgres") -> Any:
        import asyncpg

        connection = await asyncpg.connect(self.dsn(database), timeout=5)
        try:
            return await connection.fetchval(sql, *args)
        finally:
            await connection.close()

    async def create_database(self, name: str) -> str:
        """``CREATE DATABASE``; returns its SQLAlchemy URL (a replica gets it by streaming)."""
        await self.fetchval(f'CREATE DATABASE "{name}"')
        return self.url(name)

    async def wait_caught_up(self, primary: PgCluster, within: float = 15.0) -> None:
        """Until this standby has replayed everything the primary had written when called."""
        target = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + within
        while not await self.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target):
            if time.monotonic() > deadline:
                raise PgClusterError(f"{self.name} did not replay up to {target}:\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    async def pause_replay(self, within: float = 10.0) -> None:
        """A standby keeps receiving WAL but stops applying it: reads here see an older state."""
        await self.fetchval("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + within
        while await self.fetchval("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise PgClusterError(f"{self.name}: replay did not pause")
            await asyncio.sleep(0.02)

    async def resume_replay(self) -> None:
        await self.fetchval("SELECT pg_wal_replay_resume()")

    # --- teardown ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop (immediate) this server and its replicas, and remove their files."""
        for standby in self._replicas:
            standby.cleanup()
        self._replicas.clear()
        with contextlib.suppress(PgClusterError):
            self.stop("immediate", timeout=20)
        pid = self.pid
        if pid is not None:  # pg_ctl could not stop it: do not leave a server behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self._owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def __enter__(self) -> PgCluster:
        if not (self.datadir / "PG_VERSION").exists():
            self.init()
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    # --- internals -----------------------------------------------------------------------------

    def _as_owner(self) -> dict[str, Any]:
        return {"user": self._user} if self._user else {}

    def _hand_over(self, path: Path) -> None:
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, tool: str, *args: str, timeout: float = 60.0, check_log: bool = False) -> None:
        try:
            done = subprocess.run(
                [str(self.bindir / tool), *args], capture_output=True, text=True, timeout=timeout,
                cwd=self.base, **self._as_owner(),
            )
        except subprocess.TimeoutExpired as exc:
            raise PgClusterError(f"{tool} timed out after {timeout}s:\n{self.log_tail()}") from exc
        if done.returncode != 0:
            log = f"\n--- server log ---\n{self.log_tail()}" if check_log else ""
            raise PgClusterError(f"{tool} {' '.join(args[:2])} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}{log}")
