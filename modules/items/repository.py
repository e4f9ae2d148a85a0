"""Statements over the items table."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from core.db.repository import Repository
from core.db.statements import DirectRead, DirectWrite
from modules.items.domain import Item
from modules.items.models import ItemRow

_t = ItemRow.__table__.c
# Compiled once per dialect; every column is a parameter (core.db.session.DirectWrite).
_INSERT = DirectWrite(insert(cast(Table, ItemRow.__table__)))  # declared as a FromClause
# The hot read (a cache miss), compiled once and run on the driver directly (core.db.session.DirectRead).
_READ = DirectRead(
    select(_t.id, _t.name, _t.description, _t.price, _t.currency, _t.created_at, _t.updated_at)
    .where(_t.id == bindparam("item_id"))
)


class ItemRepository(Repository[ItemRow]):
    model = ItemRow

    def page(
        self,
        *,
        after: uuid.UUID | None,
        limit: int,
        name_prefix: str | None = None,
        min_price: int | None = None,
        max_price: int | None = None,
        currency: str | None = None,
    ) -> Select[ItemRow]:
        """One keyset page in id order (UUIDv7: creation order); ``limit + 1`` rows tell if more exist."""
        stmt = self.select()
        if after is not None:
            stmt = stmt.where(ItemRow.id > after)
        if name_prefix:
            escaped = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(ItemRow.name_key.like(f"{escaped}%", escape="\\"))
        if min_price is not None:
            stmt = stmt.where(ItemRow.price >= min_price)
        if max_price is not None:
            stmt = stmt.where(ItemRow.price <= max_price)
        if currency is not None:
            stmt = stmt.where(ItemRow.currency == currency)
        return stmt.order_by(ItemRow.id).limit(limit + 1)

    async def insert(self, session: AsyncSession, item: Item, name_key: str) -> None:
        """One Core INSERT of a new item (flushed now: a constraint error surfaces here)."""
        await _INSERT.run(
            session, id=item.id, name=item.name, name_key=name_key, description=item.description,
            price=item.price, currency=item.currency, version=item.version,
            created_at=item.created_at, updated_at=item.updated_at,
        )

    def prices(self, ids: Collection[uuid.UUID]) -> Select[uuid.UUID, str, int, str]:
        return select(_t.id, _t.name, _t.price, _t.currency).where(_t.id.in_(list(ids)))

    async def read(self, engine: AsyncEngine, item_id: uuid.UUID) -> Any | None:
        """The public columns of one item (a mapping) or None: no ORM entity, no session."""
        return await _READ.one(engine, item_id=item_id)
