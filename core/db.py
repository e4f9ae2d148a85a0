"""The database: engine, sessions, the declarative base and the unit of work.

Transactions are committed in exactly one place: the request edge (``TransactionalRoute``) or
a job's ``UnitOfWork``. Repositories and services only add, flush and read. After a commit the
hooks registered on the session run (the outbox relay is woken that way), so nothing leaves the
process for a transaction that rolled back.
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import DateTime, MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util.concurrency import await_, greenlet_spawn

from core.direct import AtriumSession, PerDialect, observed
from core.direct import DirectWrite as DirectWrite  # the repositories' import path for both
from core.fair_pool import FairQueuePool

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Every module's tables hang off this one metadata; each table is owned by one module."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


def utcnow() -> datetime:
    return datetime.now(UTC)


class TimestampedMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def new_id() -> uuid.UUID:
    """A UUIDv7: random enough to be unguessable, ordered by time so b-tree inserts stay local."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= (rand >> 68) << 64  # 12 random bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


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
    ping_after: float = 1.0,
) -> AsyncEngine:
    """An async engine with the pool settings exposed; SQLite gets WAL and a busy timeout.

    ``connect_timeout`` bounds establishing a PostgreSQL connection (asyncpg waits 60 s by default):
    with a server that does not answer, a request then fails (503) after at most that long.
    ``pool_pre_ping`` checks a PostgreSQL connection as it leaves the pool (``_Pinger``): its socket
    always, a round trip only after ``ping_after`` seconds idle.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            echo=echo,
            pool_pre_ping=pool_pre_ping,
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    engine = create_async_engine(
        url,
        echo=echo,
        # asyncpg prepares every statement; after five runs PostgreSQL may switch to a generic
        # plan that ignores the actual filter values (a rare name prefix then walks the primary
        # key). Custom plans cost a little planning per query and keep the indexes in use.
        connect_args={
            "server_settings": {"plan_cache_mode": "force_custom_plan"},
            **({"timeout": connect_timeout} if connect_timeout is not None else {}),
        },
        poolclass=FairQueuePool,  # waiting checkouts served in arrival order (core.fair_pool)
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=pool_recycle,
        # SQLAlchemy's asyncpg pre-ping wraps its ";" in BEGIN/ROLLBACK (for pgbouncer in
        # transaction mode, which we do not use): three round trips per checkout. Ours is one.
        pool_pre_ping=False,
    )
    if pool_pre_ping:
        pinger = _Pinger(ping_after)
        event.listen(engine.sync_engine, "checkout", pinger.checkout)
        event.listen(engine.sync_engine, "checkin", pinger.checkin)
    return engine


class _Pinger:
    """Pessimistic disconnect handling without a round trip per request.

    A connection the server closed (a restart, ``pg_terminate_backend``, an idle timeout) has its
    socket closed too, which asyncpg notices at once: ``is_closed()`` is checked on every checkout
    and the pool replaces such a connection before the request uses it. Only a connection idle for
    ``ping_after`` seconds or more (a socket a firewall may have dropped silently) also pays a ``;``
    round trip. A connection in steady use skips it: that round trip was a fifth of a database
    read's cost (bench/README.md). ``ping_after=0`` pings on every checkout.
    """

    _LAST_USED = "atrium.last_used"

    def __init__(self, ping_after: float) -> None:
        self.ping_after = ping_after

    def checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = dbapi_connection._connection
        if driver.is_closed():
            raise DisconnectionError("the server closed the connection")
        if time.monotonic() - record.info.get(self._LAST_USED, 0.0) < self.ping_after:
            return
        try:
            await_(driver.fetchrow(";"))
        except Exception as exc:
            raise DisconnectionError(f"pre-ping failed: {type(exc).__name__}: {exc}") from exc

    def checkin(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[self._LAST_USED] = time.monotonic()


class DirectRead(PerDialect):
    """A read-only Core ``SELECT`` run straight on the driver, compiled once per dialect.

    On PostgreSQL each call checks a connection out of the engine's pool (pre-ping included),
    runs the compiled SQL with asyncpg's ``fetchrow`` (a prepared statement, cached per connection)
    and checks it back in, in autocommit: no session, no transaction, no SQLAlchemy execution
    context or result processing. A database read spent three quarters of its time in those
    (bench/README.md). Rows are the driver's records (mappings by column name), so it is only for
    columns whose SQLAlchemy type converts nothing on the way out on PostgreSQL (uuid, text,
    integers, ``UTCDateTime``: asyncpg already returns aware datetimes); tests compare both paths.
    On any other database (SQLite in development), or when something listens to the engine's
    statements (``core.direct.observed``: tracing, statement logs), it is an ordinary Core
    execution in autocommit.
    Parameters are ``bindparam`` names: ``DirectRead(select(...).where(t.id == bindparam("id")))``.
    """

    async def one(self, engine: AsyncEngine, **params: Any) -> Any | None:
        """The first row (a mapping by column name) or None."""
        if engine.dialect.driver != "asyncpg" or observed(engine.sync_engine):
            async with engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                row = (await autocommit.execute(self.statement, params)).first()
            return None if row is None else row._mapping
        compiled = self.compiled(engine.dialect)
        connection = await engine.raw_connection()
        try:
            return await connection.driver_connection.fetchrow(compiled.sql, *compiled.parameters(params))
        except BaseException as exc:
            if isinstance(exc, Exception) and database_unavailable(exc):
                connection.invalidate(exc)  # a dead connection must not go back to the pool
            raise
        finally:
            await greenlet_spawn(connection.close)  # back to the pool (checkin may talk to the server)


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
        return  # a one-statement read (core.db.DirectRead): no transaction, no write lock
    connection.exec_driver_sql("BEGIN IMMEDIATE")


async def engine_lifecycle(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """``providers.Resource`` body: dispose the pool when the container's resources shut down.

    The engine itself is a plain Singleton so that its dependents stay synchronous providers.
    """
    try:
        yield engine
    finally:
        await engine.dispose()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AtriumSession, expire_on_commit=False, autoflush=False)


# SQLSTATE classes that mean "the server is not there for us right now", not "your query is wrong":
# 08 connection exception, 57P01..57P05 operator intervention (admin/crash shutdown, cannot connect
# now: starting up or shutting down, ...), 53300 too many connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P", "53300")


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


class ReadSessions:
    """Sessions for read-only use cases: round-robin over the read replicas, else the primary.

    ``open()`` checks a connection out before handing the session over (the pool pre-pings it), so
    a replica that is down is noticed there: it is skipped for ``cooloff`` seconds (logged once per
    outage), the read goes to the next replica and finally to the primary. A replica outage makes
    reads land on the primary; it never fails them. With no replicas every read session is a
    primary session. The caller rolls back (closes) a read session; nothing commits it.
    """

    def __init__(
        self,
        primary: async_sessionmaker[AsyncSession],
        replicas: Sequence[AsyncEngine] = (),
        *,
        cooloff: float = 5.0,
    ) -> None:
        self.primary = primary
        self._replicas = [session_factory(engine) for engine in replicas]
        self._names = [engine.url.render_as_string(hide_password=True) for engine in replicas]
        self._down_until = [0.0] * len(self._replicas)
        self._cooloff = cooloff
        self._turn = itertools.count()

    @property
    def replicated(self) -> bool:
        return bool(self._replicas)

    def _candidates(self) -> list[int]:
        """Replica indexes to try, round-robin, leaving out those in their cool-off."""
        count = len(self._replicas)
        if not count:
            return []
        start, now = next(self._turn) % count, time.monotonic()
        return [i for i in ((start + k) % count for k in range(count)) if self._down_until[i] <= now]

    def __call__(self) -> AsyncSession:
        """A session on the next replica not known to be down (no connection check), else the primary."""
        candidates = self._candidates()
        return self._replicas[candidates[0]]() if candidates else self.primary()

    async def open(self) -> AsyncSession:
        """A session whose connection is already checked out: a replica's that answers, else the primary's."""
        for index in self._candidates():
            session = self._replicas[index]()
            try:
                await session.connection()
            except Exception as exc:
                await _close_quietly(session)
                if not database_unavailable(exc):
                    raise
                self._mark_down(index, exc)
                continue
            if self._down_until[index]:
                logger.info("read replica {} is back; reads go to it again", self._names[index])
                self._down_until[index] = 0.0
            return session
        return self.primary()

    def _mark_down(self, index: int, exc: BaseException) -> None:
        if self._down_until[index] == 0.0:
            logger.warning("read replica {} unavailable ({}); its reads go to the primary for {:.0f}s",
                           self._names[index], type(exc).__name__, self._cooloff)
        else:
            logger.info("read replica {} still unavailable ({})", self._names[index], type(exc).__name__)
        self._down_until[index] = time.monotonic() + self._cooloff


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception as exc:  # the connection is already gone; nothing to give back
        logger.debug("closing a failed read session: {}", type(exc).__name__)


AfterCommit = Callable[[], Awaitable[None] | None]


def on_commit(session: AsyncSession, hook: AfterCommit) -> None:
    """Run ``hook`` once, after this session's transaction commits (never on rollback).

    An async hook is awaited before ``commit`` returns, so at the request edge it finishes
    before the response is sent (cache invalidation relies on that).
    """
    hooks: list[AfterCommit] = session.info.setdefault("after_commit", [])
    if hook not in hooks:
        hooks.append(hook)


async def commit(session: AsyncSession, *, close: bool = False) -> None:
    """Commit, then run the after-commit hooks; the only commit in the code base.

    ``close=True`` also closes the session (always, even when the commit fails), in the same hop
    into SQLAlchemy's greenlet as the commit: the request edge's end of a transaction. The hooks
    are taken off the session first: a commit that fails drops them with its transaction.
    """
    hooks: list[AfterCommit] = session.info.pop("after_commit", [])
    if close and not (isinstance(session, AtriumSession) and session.in_direct_transaction()):
        await greenlet_spawn(_commit_and_close, session.sync_session)
    elif close:
        try:
            await session.commit()
        finally:
            await session.close()
    else:
        await session.commit()
    for hook in hooks:
        result = hook()
        if inspect.isawaitable(result):
            await result


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    finally:
        session.close()


async def rollback(session: AsyncSession) -> None:
    session.info.pop("after_commit", None)
    await session.rollback()


def insert_or_ignore(session: AsyncSession, model: type[Base]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the session's dialect (PostgreSQL or SQLite)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    builder: Any = pg_insert if dialect == "postgresql" else sqlite_insert
    return builder(model).on_conflict_do_nothing()


class UnitOfWork:
    """One transaction for a job: ``async with uow as session: ...`` commits on success."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> AsyncSession:
        self._session = self._sessions()
        return self._session

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        session, self._session = self._session, None
        assert session is not None
        try:
            if exc_type is None:
                await commit(session)
            else:
                await rollback(session)
        finally:
            await session.close()
