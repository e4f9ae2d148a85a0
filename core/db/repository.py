"""A tiny typed base for repositories: statement builders plus the few calls every one needs.

Repositories never commit; they add, flush (to surface constraint errors where the service can
handle them) and read. Anything specific is a method that returns a statement.
"""

from __future__ import annotations

import uuid
from typing import Generic, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db.base import Base

M = TypeVar("M", bound=Base)


class Repository(Generic[M]):
    model: type[M]

    def select(self) -> Select[M]:
        return select(self.model)

    async def get(self, session: AsyncSession, id_: uuid.UUID, *, for_update: bool = False) -> M | None:
        """The row by primary key; ``for_update`` locks it until the transaction ends."""
        return await session.get(self.model, id_, with_for_update=for_update, populate_existing=for_update)

    async def one_or_none(self, session: AsyncSession, statement: Select[M]) -> M | None:
        return (await session.execute(statement)).scalars().first()

    async def all(self, session: AsyncSession, statement: Select[M]) -> list[M]:
        return list((await session.execute(statement)).scalars().all())

    async def add(self, session: AsyncSession, obj: M) -> M:
        session.add(obj)
        await session.flush()
        return obj
