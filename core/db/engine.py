"""Engines: the pool settings, SQLite's pragmas for development, and what "the database is down" means.

With the fast path on (``core.fastpath``), a PostgreSQL engine gets the fast path's pool (waiting
checkouts served in arrival order) and its cheaper pre-ping; otherwise SQLAlchemy's own pool and
``pool_pre_ping``. Either way the engine carries the execution option ``atrium_fast_path`` that
``core.db.statements`` and ``core.db.session`` read.

A database that stops answering (a hung or paused server, a network that drops packets) must not
hold requests forever: every PostgreSQL statement, ping and connect is bounded (``statement_timeout``,
``connect_timeout``), a statement the client gave up on becomes ``DatabaseTimeout`` (answered 503) and
its connection is dropped at once, so the pool serves again as soon as the server does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

# ``sa_asyncio.create_async_engine`` is looked up on its module at each call: with tracing on, the
# SQLAlchemy instrumentation replaces it there (core.observability.tracing) and traces every engine
# made from then on.

FAST_PATH = "atrium_fast_path"  # the engine's execution option: True when the fast path serves it

# Seconds the client waits beyond the server's own statement_timeout before it gives up on a
# statement. A slow statement is cancelled by the server, which answers with an error and keeps the
# connection; only a server that answers nothing, not even that, reaches the client's limit.
STATEMENT_GRACE = 1.0


class DatabaseTimeout(OperationalError):
    """The database did not answer a statement within the client's limit (statement timeout +
    ``STATEMENT_GRACE``); the connection was dropped. Answered 503 like any other outage."""


def timed_out(statement: str | None, error: BaseException) -> DatabaseTimeout:
    """``error`` (asyncio's TimeoutError from the driver) as the ``DatabaseTimeout`` callers see.
    Parameters are never kept: the error is logged, and they may hold personal data."""
    return DatabaseTimeout(statement, None, error, hide_parameters=True, connection_invalidated=True)


def fast_path_enabled(engine: AsyncEngine) -> bool:
    """True when ``engine`` was made for the fast path (``create_engine(..., fast_path=True)``)."""
    return bool(engine.sync_engine.get_execution_options().get(FAST_PATH, False))


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    pool_timeout: float = 5.0,
    pool_recycle: int = 1800,
    pool_pre_ping: bool = True,
    echo: bool = False,
    connect_timeout: float | None = None,
    statement_timeout: float | None = None,
    ping_after: float = 1.0,
    fast_path: bool = False,
    fair_pool: bool | None = None,
) -> AsyncEngine:
    """An async engine with the pool settings exposed; SQLite gets WAL and a busy timeout.

    ``connect_timeout`` bounds establishing a PostgreSQL connection (asyncpg waits 60 s by default):
    with a server that does not answer, a request then fails (503) after at most that long.
    ``statement_timeout`` (None: unbounded, as migrations want) is PostgreSQL's ``statement_timeout``
    for every session of the pool; the client waits ``STATEMENT_GRACE`` seconds more for any
    command (a statement, BEGIN/COMMIT, a ping) before it raises ``DatabaseTimeout`` and drops the
    connection. On SQLite it is the busy timeout (default 30 s): how long a statement waits for
    another connection's write lock.
    ``pool_pre_ping`` checks a PostgreSQL connection as it leaves the pool. With ``fast_path`` a
    PostgreSQL engine takes the fast path's pool and pre-ping (``core.fastpath.pool``: its socket
    always, a round trip only after ``ping_after`` seconds idle) and the statements of
    ``core.db.statements`` go straight to the driver. ``fair_pool`` (default: as ``fast_path``)
    takes the pool alone, for measuring it apart.
    """
    fair_pool = fast_path if fair_pool is None else fair_pool
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa_asyncio.create_async_engine(
            url,
            echo=echo,
            pool_pre_ping=pool_pre_ping,
            connect_args={"timeout": 30 if statement_timeout is None else statement_timeout},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        engine.sync_engine.update_execution_options(**{FAST_PATH: fast_path})
        return engine
    options: dict[str, Any] = {"pool_pre_ping": pool_pre_ping}
    if fair_pool:
        from core.fastpath.pool import FairQueuePool

        # The fast path pings itself (below): SQLAlchemy's asyncpg pre-ping is three round trips.
        options = {"poolclass": FairQueuePool, "pool_pre_ping": False}
    # asyncpg prepares every statement; after five runs PostgreSQL may switch to a generic plan
    # that ignores the actual filter values (a rare name prefix then walks the primary key).
    # Custom plans cost a little planning per query and keep the indexes in use.
    server_settings = {"plan_cache_mode": "force_custom_plan"}
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    if connect_timeout is not None:
        connect_args["timeout"] = connect_timeout
    if statement_timeout is not None:
        server_settings["statement_timeout"] = str(max(1, round(statement_timeout * 1000)))  # ms
        # asyncpg's default timeout of every command on the connection, the cancellation of a
        # timed-out one included: the bound on a server that answers nothing.
        connect_args["command_timeout"] = statement_timeout + STATEMENT_GRACE
    engine = sa_asyncio.create_async_engine(
        url,
        echo=echo,
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=pool_recycle,
        **options,
    )
    engine.sync_engine.update_execution_options(**{FAST_PATH: fast_path})
    event.listen(engine.sync_engine, "handle_error", _client_timeout)
    event.listen(engine.sync_engine, "invalidate", drop_if_timed_out)
    if fair_pool and pool_pre_ping:
        from core.fastpath.pool import Pinger

        pinger = Pinger(ping_after)
        event.listen(engine.sync_engine, "checkout", pinger.checkout)
        event.listen(engine.sync_engine, "checkin", pinger.checkin)
    return engine


def _client_timeout(context: ExceptionContext) -> BaseException | None:
    """``handle_error``: a statement the driver gave up on (asyncio's TimeoutError) is raised as
    ``DatabaseTimeout`` and its connection invalidated, never handed back to the pool: its state is
    unknown and its cancellation may still be pending on a server that answers nothing."""
    error = context.original_exception
    if not isinstance(error, TimeoutError) or context.connection is None:
        return None
    context.is_disconnect = True
    # Only this connection: the others are pinged when they leave the pool, and a pool-wide
    # invalidation would close healthy ones too when a single connection's network path failed.
    context.invalidate_pool_on_disconnect = False
    return timed_out(context.statement, error)


def _timed_out(reason: BaseException | None) -> bool:
    seen = 0
    while reason is not None and seen < 5:
        if isinstance(reason, TimeoutError):
            return True
        reason = getattr(reason, "orig", None) or reason.__cause__
        seen += 1
    return False


def drop_if_timed_out(_dbapi_connection: Any, record: Any, reason: BaseException | None) -> None:
    """Pool ``invalidate`` event: a connection invalidated because the server did not answer in
    time is closed at once (asyncpg's ``terminate()``), not gracefully: SQLAlchemy's graceful close
    would wait up to 2 s more for a cancellation the server is not going to acknowledge."""
    if _timed_out(reason):
        terminate = getattr(record.driver_connection, "terminate", None)
        if terminate is not None:
            terminate()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling emits no BEGIN before a SAVEPOINT, which breaks nested
    # transactions; turn it off and let SQLAlchemy emit BEGIN itself (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front: a read-then-write transaction can then never fail
    # with "database is locked" because another connection wrote in between. SQLite serves
    # development, where serialised transactions cost nothing that matters.
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return  # a one-statement read (core.db.session.DirectRead): no transaction, no write lock
    connection.exec_driver_sql("BEGIN IMMEDIATE")


async def engine_lifecycle(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """``providers.Resource`` body: dispose the pool when the container's resources shut down.

    The engine itself is a plain Singleton so that its dependents stay synchronous providers.
    """
    try:
        yield engine
    finally:
        await engine.dispose()


# SQLSTATE classes that mean "the server is not there for us right now", not "your query is wrong":
# 08 connection exception, 57P01..57P05 operator intervention (admin/crash shutdown, cannot connect
# now: starting up or shutting down, ...), 57014 query canceled (the statement timeout, or an
# operator's pg_cancel_backend), 53300 too many connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P", "57014", "53300")


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached or dropped the connection.

    Covers what SQLAlchemy wraps (a pool timeout, an invalidated connection) and what asyncpg
    raises unwrapped while connecting (refused, timed out, "the database system is shutting down").
    """
    if isinstance(exc, PoolTimeout | OSError):  # OSError: refused, reset, timed out, no route, ...
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and code.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return False


def create_engines(urls: Sequence[str], **options: Any) -> list[AsyncEngine]:
    """One engine per URL, each with the same pool options (the read replicas)."""
    return [create_engine(url, **options) for url in urls]


async def engines_lifecycle(engines: list[AsyncEngine]) -> AsyncIterator[list[AsyncEngine]]:
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.dispose()

