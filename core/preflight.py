"""What a command checks before it starts: that the servers it needs answer.

``atrium migrate``, ``create-admin`` and ``worker`` need the database from their first second, the
worker its broker too. Left to Alembic, SQLAlchemy or dramatiq, a server that is down or a wrong port
surfaced as a traceback of a hundred lines; here one connection, bounded by a timeout, turns it into
one line naming the setting and the cause, which the CLI prints before exiting with status 2:

    ATRIUM_DATABASE_URL: cannot connect to 127.0.0.1:5999 (connection refused)

A URL's user and password are never part of a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sqlite3
import threading
from typing import Any
from urllib.parse import urlsplit

DATABASE = "ATRIUM_DATABASE_URL"
BROKER = "ATRIUM_BROKER_URL"
_DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671}
# SQLSTATE 42P01 (PostgreSQL) and SQLite's message: a table the schema does not have (yet).
_MISSING_TABLE = re.compile(r'no such table: (\w+)|relation "([^"]+)" does not exist')


class NotReady(RuntimeError):
    """A server a command needs does not answer, or its database lacks the schema; the message is
    one line naming the setting."""


async def check_database(url: str, within: float, *, table: str | None = None) -> None:
    """Open one connection to ``url`` and run ``SELECT 1`` in ``within`` seconds (SQLite: open
    the file, creating it and its folder as the engine does), and see that ``table`` exists (the
    database is migrated); ``NotReady`` otherwise."""
    from sqlalchemy import inspect, text
    from sqlalchemy.engine import make_url

    from core.db.engine import create_engine

    if make_url(url).get_backend_name() == "sqlite":
        _check_sqlite(url, within, table)
        return
    engine = None
    migrated = True
    try:
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=False,
                               connect_timeout=within, statement_timeout=within)
        async with asyncio.timeout(within * 3):  # connect, the query, the table: each bounded
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
                if table is not None:
                    migrated = await connection.run_sync(lambda sync: inspect(sync).has_table(table))
    except Exception as exc:
        raise NotReady(f"{DATABASE}: {database_problem(url, exc, within)}") from exc
    finally:
        if engine is not None:
            await engine.dispose()
    if not migrated:
        raise NotReady(f"{DATABASE}: the database has no table {table!r}; run `atrium migrate` first")


def _check_sqlite(url: str, within: float, table: str | None) -> None:
    """The SQLite file opens (created with its folder, as the engine would) and holds ``table``.
    With the standard library, not aiosqlite: its worker thread may outlive a failed connect and
    report on an event loop that is already closed."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    path = make_url(url).database
    if not path or path == ":memory:":
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=within)) as connection:
            found = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
                                       (table or "",)).fetchone()
    except (OSError, sqlite3.Error) as exc:
        raise NotReady(f"{DATABASE}: {database_problem(url, exc, within)}") from exc
    if table is not None and found is None:
        raise NotReady(f"{DATABASE}: the database has no table {table!r}; run `atrium migrate` first")


def check_broker(backend: str, url: str, timeout: float) -> None:
    """Connect to the broker at ``url`` (``backend`` redis or rabbitmq) within ``timeout`` seconds;
    ``NotReady`` otherwise. One attempt, no retries (redis-py retries ten times by default, which
    would turn "refused" into "no answer"), in a daemon thread: a client blocked on a silent server
    can't hold the process past its one-line exit."""
    failures: list[BaseException] = []

    def ping() -> None:
        try:
            (_ping_redis if backend == "redis" else _ping_rabbitmq)(url, timeout)
        except BaseException as exc:  # reported by the caller's thread
            failures.append(exc)

    thread = threading.Thread(target=ping, name="atrium-broker-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NotReady(f"{BROKER}: cannot connect to {_where(url)} (no answer within {timeout:g} s)")
    if failures:
        raise NotReady(f"{BROKER}: cannot connect to {_where(url)} "
                       f"({cause(failures[0], timeout, url)})") from failures[0]


def _ping_redis(url: str, timeout: float) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                  retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    finally:
        client.close()


def _ping_rabbitmq(url: str, timeout: float) -> None:
    import pika

    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    # pika logs each failed step (socket, connector, workflow: six lines and a traceback) before it
    # raises; the caller's one line says it all.
    quiet = logging.getLogger("pika")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        pika.BlockingConnection(parameters).close()
    finally:
        quiet.setLevel(level)


def database_problem(url: str, exc: BaseException, timeout: float) -> str:
    """What went wrong reaching the database at ``url``, for a line after ``ATRIUM_DATABASE_URL:``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"cannot open the SQLite file {parsed.database} ({cause(exc, timeout, url)})"
    where = _where(url) if parsed.host else f"the local socket (port {parsed.port or 5432})"
    return f"cannot connect to {where} ({cause(exc, timeout, url)})"


def missing_table(exc: BaseException) -> str | None:
    """The table a statement needed and the schema lacks (the database is not migrated), else None."""
    for error in _chain(exc):
        found = _MISSING_TABLE.search(str(error).splitlines()[0] if str(error) else "")
        if found:
            return found.group(1) or found.group(2)
    return None


def cause(exc: BaseException, timeout: float | None = None, url: str = "") -> str:
    """A short reason for a failed connection: refused, no answer, unknown host, the server's message."""
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, TimeoutError):
            return f"no answer within {timeout:g} s" if timeout else "no answer in time"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return "unknown host"
        if "AuthenticationError" in type(error).__name__:  # redis-py's, pika's Probable...
            return "authentication failed: check the user and password"
    for error in reversed(chain):  # the innermost error with a server's SQLSTATE: its own message
        if isinstance(getattr(error, "sqlstate", None), str) and str(error):
            return _scrub(str(error).splitlines()[0], url)
        if isinstance(error, sqlite3.Error) and str(error):  # "unable to open database file", ...
            return str(error).splitlines()[0]
    for error in chain:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror.lower()
    # The driver's own words, not SQLAlchemy's wrapper around them (which quotes the statement).
    inner = [e for e in chain if str(e) and not type(e).__module__.startswith("sqlalchemy")]
    if inner:
        return _scrub(str(inner[-1]).splitlines()[0], url)
    return _scrub(type(exc).__name__, url)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (SQLAlchemy's ``orig``, causes, pika's ``exception``, argument lists),
    outermost first."""
    found: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo and len(found) < 20:
        error = todo.pop(0)
        if not isinstance(error, BaseException) or any(error is seen for seen in found):
            continue
        found.append(error)
        todo += [getattr(error, "orig", None), getattr(error, "exception", None), error.__cause__,
                 error.__context__, *(getattr(error, "exceptions", None) or ())]
        for arg in error.args:
            todo += list(arg) if isinstance(arg, list | tuple) else [arg]
    return found


def _where(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.partition("+")[0]
    if scheme == "unix":
        return parts.path
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    host = parts.hostname or "localhost"
    return f"{host}:{port}" if port else host


def _scrub(text: str, url: str) -> str:
    """``text`` without the URL's password, should a library have quoted it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text
