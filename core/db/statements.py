"""Hot statements built once: ``DirectRead`` (one row, autocommit) and ``DirectWrite`` (a plain
``INSERT``/``UPDATE``/``DELETE`` inside the session's transaction).

Both are ordinary SQLAlchemy Core executions. On an engine made for the fast path
(``core.db.engine.create_engine(..., fast_path=True)``) over asyncpg they are handed to
``core.fastpath.transactions``, which compiles them once and sends them straight to the driver;
tests run both paths and compare what they return and write.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql import Executable

from core.db.engine import fast_path_enabled


class DirectRead:
    """A read-only Core ``SELECT`` of at most one row, run in autocommit (no transaction).

    Rows are mappings by column name. Only for columns whose SQLAlchemy type converts nothing on
    the way out on PostgreSQL (uuid, text, integers, ``UTCDateTime``), since the fast path returns
    the driver's records as they are.
    Parameters are ``bindparam`` names: ``DirectRead(select(...).where(t.id == bindparam("id")))``.
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self.compiled: dict[str, Any] = {}  # per dialect, filled by the fast path

    async def one(self, engine: AsyncEngine, **params: Any) -> Any | None:
        """The first row (a mapping by column name) or None."""
        if fast_path_enabled(engine):
            from core.fastpath.transactions import read_one

            handled, row = await read_one(engine, self, params)
            if handled:
                return row
        async with engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            return (await autocommit.execute(self.statement, params)).mappings().first()


class DirectWrite:
    """A Core ``INSERT``/``UPDATE``/``DELETE`` inside the session's transaction.

    The session owns the transaction: the request edge commits or rolls it back as for any other
    statement, and errors are SQLAlchemy's (``IntegrityError``, ...).
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self.compiled: dict[str, Any] = {}  # per dialect, filled by the fast path

    async def run(self, session: AsyncSession, **params: Any) -> None:
        bind = session.bind
        if isinstance(bind, AsyncEngine) and fast_path_enabled(bind):
            from core.fastpath.transactions import write

            if await write(session, self, params):
                return
        await session.execute(self.statement, params)
