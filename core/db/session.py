"""Sessions, the one commit, after-commit hooks and the unit of work.

Transactions are committed in exactly one place: the request edge (``TransactionalRoute``) or
a job's ``UnitOfWork``. Repositories and services only add, flush and read. After a commit the
hooks registered on the session run (the outbox relay is woken that way), so nothing leaves the
process for a transaction that rolled back.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from core.db.base import Base
from core.db.engine import fast_path_enabled

# In ``session.info`` while the fast path holds a transaction of its own open (core.fastpath.transactions).
DIRECT_TRANSACTION = "atrium.direct_transaction"


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``engine``; on a fast-path engine, the fast path's session class (plain writes
    skip the ORM's transaction machinery: ``core.fastpath.transactions``)."""
    session_class: type[AsyncSession] = AsyncSession
    if fast_path_enabled(engine):
        from core.fastpath.transactions import AtriumSession

        session_class = AtriumSession
    return async_sessionmaker(engine, class_=session_class, expire_on_commit=False, autoflush=False)


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
    if close and DIRECT_TRANSACTION not in session.info:
        await session.run_sync(_commit_and_close)
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
