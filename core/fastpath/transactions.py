"""Statements compiled once and sent straight to the driver, and the session that lets a plain write
skip the ORM's transaction machinery.

A one-row insert through an ORM ``Session`` paid for the session's transaction bookkeeping, the
engine ``Connection`` and its execution context about as much as for the three round trips
themselves (bench/README.md). ``DirectWrite`` on an ``AtriumSession`` backed by asyncpg instead
begins a *direct transaction*: a connection checked out of the same pool (same pre-ping, same
limits), ``BEGIN`` through SQLAlchemy's own asyncpg adapter, the statement on the driver. The
session stays the one owner of the transaction:

- ``commit()``, ``rollback()`` and ``close()`` end the direct transaction (and run nothing else
  when the session did nothing else);
- anything that needs a connection from the session (a query, a flush, ``session.connection()``)
  *adopts* it: the session gets an engine ``Connection`` around the same pooled connection, whose
  adapter already holds the open transaction, so the ORM's statements land in it and the
  session's commit commits it. The connection goes back to the pool when the session's
  transaction ends.

A session on any other driver (SQLite in development), already in a transaction of its own, or on
an engine whose statements something listens to (``observed``: tracing, statement logs), runs
``DirectWrite`` the ordinary way (``core.db.statements``): a Core execution in the session's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util.concurrency import greenlet_spawn

from core.db.engine import database_unavailable, timed_out
from core.db.session import DIRECT_TRANSACTION
from core.observability import tracing

_DIRECT = DIRECT_TRANSACTION  # in session.info while a direct transaction is open


class _Compiled:
    """A statement compiled for one dialect: its SQL, and per positional parameter its name and the
    column type's bind processor (what SQLAlchemy would apply to the value)."""

    __slots__ = ("binds", "sql")

    def __init__(self, statement: ClauseElement, dialect: Any) -> None:
        query = cast("SQLCompiler", statement.compile(dialect=dialect))  # a statement's compiler
        self.sql: str = query.string
        self.binds = tuple(
            (name, query.binds[name].type.bind_processor(dialect)) for name in query.positiontup or ()
        )

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(values[name] if process is None else process(values[name])
                     for name, process in self.binds)


def compiled(holder: Any, dialect: Any) -> _Compiled:
    """``holder.statement`` compiled for ``dialect``, kept in ``holder.compiled`` (a
    ``core.db.statements.DirectRead`` or ``DirectWrite``) after the first use."""
    found: _Compiled | None = holder.compiled.get(dialect.name)
    if found is None:
        found = holder.compiled[dialect.name] = _Compiled(holder.statement, dialect)
    return found


def observed(engine: Any) -> bool:
    """True when something listens to ``engine``'s statements (``before_cursor_execute`` or
    ``after_cursor_execute``: tracing instrumentation, statement logs, tests). Statements sent
    straight to the driver would slip past it, so the direct paths step aside. The tracing
    instrumentation's listeners count only in a traced request or job (``tracing.recording``): in
    an unsampled one they would make no span."""
    dispatch = engine.dispatch
    before, after = dispatch.before_cursor_execute, dispatch.after_cursor_execute
    if not (before or after):
        return False
    if tracing.recording():
        return True
    return not all(tracing.is_instrumentation(listener) for listener in (*before, *after))


class _DirectTransaction:
    """A transaction begun on a pooled asyncpg connection, outside the session's bookkeeping."""

    __slots__ = ("adapter", "adopted", "connection", "dialect", "engine", "fairy")

    def __init__(self, engine: Any, fairy: Any) -> None:
        self.engine = engine  # the sync Engine
        self.dialect = engine.dialect
        self.fairy = fairy  # the pool's proxy: close() checks the connection back in
        self.adapter = fairy.dbapi_connection  # SQLAlchemy's asyncpg adapter: it tracks the transaction
        self.connection: Connection | None = None  # what the session is handed (get_bind)
        self.adopted = False  # the session began its transaction on that connection

    async def begin(self) -> None:
        try:
            await self.adapter._start_transaction()
        except Exception as exc:
            raise self._error(exc, "BEGIN", ()) from exc

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> None:
        try:
            await self.adapter._connection.execute(sql, *parameters)
        except Exception as exc:
            raise self._error(exc, sql, parameters) from exc

    async def end(self, *, commit: bool) -> None:
        """Commit or roll back, then give the connection back (always, even when that fails)."""
        transaction, self.adapter._transaction = self.adapter._transaction, None
        try:
            if transaction is not None:
                try:
                    await (transaction.commit() if commit else transaction.rollback())
                except Exception as exc:
                    raise self._error(exc, "COMMIT" if commit else "ROLLBACK", ()) from exc
                except BaseException:
                    self.fairy.invalidate()  # cancelled mid-COMMIT: its state is unknown, never reuse it
                    raise
        finally:
            await greenlet_spawn(self.fairy.close)

    async def discard(self) -> None:
        """Drop the connection without a word to the server (``Session.invalidate``)."""
        self.adapter._transaction = None
        await greenlet_spawn(_invalidate_and_close, self.fairy)

    def connection_for_session(self) -> Connection:
        """An engine ``Connection`` on the same pooled connection, for the session to begin on."""
        if self.connection is None:
            self.connection = Connection(self.engine, connection=self.fairy)
        return self.connection

    def _error(self, exc: Exception, statement: str, parameters: tuple[Any, ...]) -> Exception:
        """``exc`` as SQLAlchemy would raise it from the session (``IntegrityError``, ...); a
        connection found dead is invalidated, so the pool does not hand it out again. A command the
        driver gave up on (the server answered nothing within the command timeout) is the stock
        path's ``DatabaseTimeout``, its connection closed at once and its transaction forgotten."""
        if isinstance(exc, TimeoutError):
            self.adapter._transaction = None  # nothing left to roll back on a dropped connection
            self.fairy.invalidate(exc)  # closed at once: core.db.engine.drop_if_timed_out
            return timed_out(statement, exc)
        try:
            self.adapter._handle_exception(exc)  # raises the adapter's DBAPI-level error
        except Exception as translated:
            dbapi_error = translated
        else:  # pragma: no cover - _handle_exception always raises
            dbapi_error = exc
        dead = self.dialect.is_disconnect(dbapi_error, self.adapter, None)
        if dead:
            self.fairy.invalidate(dbapi_error)
        return DBAPIError.instance(statement, parameters, dbapi_error, self.dialect.loaded_dbapi.Error,
                                   connection_invalidated=dead, dialect=self.dialect)


def _invalidate_and_close(fairy: Any) -> None:
    fairy.invalidate()
    fairy.close()


class _SyncSession(Session):
    def get_bind(self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any) -> Any:
        direct: _DirectTransaction | None = self.info.get(_DIRECT)
        if direct is not None and bind is None:
            return direct.connection_for_session()  # statements join the direct transaction
        return super().get_bind(mapper, clause=clause, bind=bind, **kw)

    def begin(self, nested: bool = False) -> SessionTransaction:
        transaction = super().begin(nested=nested)
        direct: _DirectTransaction | None = self.info.get(_DIRECT)
        if direct is not None and not direct.adopted:
            self.connection()  # a begin() block takes the direct transaction over, even if it runs nothing
        return transaction


@event.listens_for(_SyncSession, "after_begin")
def _adopted(session: Session, _transaction: SessionTransaction, connection: Connection) -> None:
    direct: _DirectTransaction | None = session.info.get(_DIRECT)
    if direct is not None and connection is direct.connection:
        direct.adopted = True  # from now on the session commits or rolls it back


@event.listens_for(_SyncSession, "after_transaction_end")
def _release_adopted(session: Session, transaction: SessionTransaction) -> None:
    # The session ended an adopted direct transaction: the connection, which the session does not
    # own (it was handed one), goes back to the pool.
    if transaction.parent is None and not transaction.nested:
        direct: _DirectTransaction | None = session.info.get(_DIRECT)
        if direct is not None and direct.adopted:
            del session.info[_DIRECT]
            assert direct.connection is not None
            direct.connection.close()


class AtriumSession(AsyncSession):
    """The application's session: an ``AsyncSession`` that also ends a direct transaction."""

    sync_session_class = _SyncSession

    def _unadopted(self) -> _DirectTransaction | None:
        direct: _DirectTransaction | None = self.info.get(_DIRECT)
        return direct if direct is not None and not direct.adopted else None

    async def direct_transaction(self) -> _DirectTransaction | None:
        """The open direct transaction, begun now if the session is idle on asyncpg; else None."""
        direct: _DirectTransaction | None = self.info.get(_DIRECT)
        if direct is not None:
            return None if direct.adopted else direct
        bind = self.bind  # only a session on an engine (not one joined to a caller's connection)
        if self.in_transaction() or not isinstance(bind, AsyncEngine) or bind.dialect.driver != "asyncpg":
            return None
        if observed(bind.sync_engine):
            return None
        fairy = await bind.raw_connection()  # the pool's checkout, pre-ping included
        direct = _DirectTransaction(bind.sync_engine, fairy)
        try:
            await direct.begin()
        except BaseException as exc:
            if not isinstance(exc, Exception):
                fairy.invalidate()  # cancelled mid-BEGIN: its state is unknown, never reuse it
            await greenlet_spawn(fairy.close)
            raise
        self.info[_DIRECT] = direct
        return direct

    def in_direct_transaction(self) -> bool:
        return _DIRECT in self.info

    async def commit(self) -> None:
        direct = self._unadopted()
        if direct is None:
            return await super().commit()
        if not self.in_transaction():  # only direct statements: commit them here
            del self.info[_DIRECT]
            return await direct.end(commit=True)
        await greenlet_spawn(self.sync_session.connection)  # adopt, then commit it all as one
        return await super().commit()

    async def rollback(self) -> None:
        await self._end_unadopted()
        return await super().rollback()

    async def close(self) -> None:
        await self._end_unadopted()
        if not self.sync_session.in_transaction():
            # Nothing holds a connection, so closing is bookkeeping only (it expunges the
            # objects): done here, without the hop into SQLAlchemy's greenlet that I/O needs.
            return self.sync_session.close()
        return await super().close()

    async def reset(self) -> None:
        await self._end_unadopted()
        return await super().reset()

    async def invalidate(self) -> None:
        await self._end_unadopted(invalidate=True)
        return await super().invalidate()

    async def _end_unadopted(self, *, invalidate: bool = False) -> None:
        direct = self._unadopted()
        if direct is not None:
            del self.info[_DIRECT]
            await (direct.discard() if invalidate else direct.end(commit=False))


async def write(session: AsyncSession, statement: Any, params: Mapping[str, Any]) -> bool:
    """Run ``statement`` (a ``core.db.statements.DirectWrite``) in a direct transaction when the
    session can take one (an idle ``AtriumSession`` over asyncpg, nothing listening); False
    when it cannot, and the caller runs it the ordinary way."""
    if not isinstance(session, AtriumSession):
        return False
    direct = await session.direct_transaction()
    if direct is None:
        return False
    query = compiled(statement, direct.dialect)
    await direct.execute(query.sql, query.parameters(params))
    return True


async def read_one(engine: AsyncEngine, statement: Any, params: Mapping[str, Any]) -> tuple[bool, Any]:
    """``(True, row or None)`` for ``statement`` (a ``core.db.statements.DirectRead``) run with
    asyncpg's ``fetchrow`` on a pooled connection in autocommit (a prepared statement, cached per
    connection): no session, no SQLAlchemy execution context or result processing, which were three
    quarters of a database read (bench/README.md). ``(False, None)`` on another driver or an
    observed engine: the caller runs it the ordinary way."""
    if engine.dialect.driver != "asyncpg" or observed(engine.sync_engine):
        return False, None
    query = compiled(statement, engine.dialect)
    connection = await engine.raw_connection()
    try:
        driver: Any = connection.driver_connection  # asyncpg's connection while checked out
        return True, await driver.fetchrow(query.sql, *query.parameters(params))
    except TimeoutError as exc:  # no answer within the command timeout: as the stock path says it
        connection.invalidate(exc)  # closed at once: core.db.engine.drop_if_timed_out
        raise timed_out(query.sql, exc) from exc
    except BaseException as exc:
        if isinstance(exc, Exception) and database_unavailable(exc):
            connection.invalidate(exc)  # a dead connection must not go back to the pool
        raise
    finally:
        await greenlet_spawn(connection.close)  # back to the pool (checkin may talk to the server)
