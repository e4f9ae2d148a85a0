"""Items use cases. Never commits: the request edge does."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.cache.read_through import ReadThroughCache
from core.db.base import new_id, utcnow
from core.db.session import on_commit
from core.edge.pagination import CursorCodec, InvalidCursor
from core.messaging.outbox import Outbox
from modules.items.domain import Item, ItemNotFound, name_key
from modules.items.models import ItemRow
from modules.items.public import ItemPrice, ItemPriceChanged
from modules.items.repository import ItemRepository
from modules.items.schemas import ItemCreate, ItemRead, ItemUpdate


@dataclass(frozen=True, slots=True)
class ItemFilters:
    q: str | None = None
    min_price: int | None = None
    max_price: int | None = None
    currency: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "min_price": self.min_price,
            "max_price": self.max_price,
            "currency": self.currency,
        }


def _to_domain(row: ItemRow) -> Item:
    return Item(
        row.id,
        row.name,
        row.description,
        row.price,
        row.currency,
        row.version,
        row.created_at,
        row.updated_at,
    )


class ItemService:
    def __init__(
        self,
        repository: ItemRepository,
        outbox: Outbox,
        cache: ReadThroughCache,
        cursors: CursorCodec,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self._items = repository
        self._outbox = outbox
        self._cache = cache
        self._cursors = cursors
        self._sessions = sessions

    async def create(self, session: AsyncSession, data: ItemCreate) -> Item:
        """Add an item to the catalog (a Core INSERT: no ORM unit of work on the hot write)."""
        now = utcnow()
        item = Item(new_id(), data.name, data.description, data.price, data.currency, 1, now, now)
        await self._items.insert(session, item, name_key(data.name))
        return item

    async def get(self, session: AsyncSession, item_id: uuid.UUID) -> Item:
        """One item from the database (no cache)."""
        row = await self._items.get(session, item_id)
        if row is None:
            raise ItemNotFound()
        return _to_domain(row)

    async def read_json(self, item_id: uuid.UUID) -> bytes:
        """The item's JSON representation, from the cache when warm; ``ItemNotFound`` if absent."""
        body = await self._cache.get(item_id, functools.partial(self._load_json, item_id))
        if body is None:
            raise ItemNotFound()
        return body

    async def _load_json(self, item_id: uuid.UUID) -> bytes | None:
        # Deliberately the primary, not a read replica: this fills the shared cache, and the first
        # miss after a PATCH (the invalidation) would otherwise store the replica's pre-write row
        # under the new generation, for every process, until the TTL. Misses are rare; hits are
        # what the cache serves (README "Read replicas").
        # One statement, nothing to commit: autocommit, straight on the driver (core.db.session.DirectRead).
        row = await self._items.read(self._sessions.kw["bind"], item_id)
        return None if row is None else ItemRead.model_validate(dict(row)).model_dump_json().encode()

    async def list(
        self, session: AsyncSession, filters: ItemFilters, limit: int, cursor: str | None
    ) -> tuple[list[Item], str | None]:
        """A page of items in creation order, plus the cursor of the next page (None at the end)."""
        criteria = filters.as_dict()
        after = None
        if cursor is not None:
            position = self._cursors.decode(cursor, criteria)
            try:
                after = uuid.UUID(str(position.get("id")))
            except ValueError:
                raise InvalidCursor() from None
        stmt = self._items.page(
            after=after,
            limit=limit,
            name_prefix=name_key(filters.q) if filters.q else None,
            min_price=filters.min_price,
            max_price=filters.max_price,
            currency=filters.currency,
        )
        rows = await self._items.all(session, stmt)
        items = [_to_domain(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = self._cursors.encode({"id": str(items[-1].id)}, criteria)
        return items, next_cursor

    async def update(self, session: AsyncSession, item_id: uuid.UUID, changes: ItemUpdate) -> Item:
        """Change some fields; a price or currency change publishes ``ItemPriceChanged``."""
        row = await self._items.get(session, item_id, for_update=True)  # concurrent edits queue up
        if row is None:
            raise ItemNotFound()
        old_price, old_currency = row.price, row.currency
        for field, value in changes.model_dump(exclude_unset=True).items():
            setattr(row, field, value)
        if changes.name is not None:
            row.name_key = name_key(changes.name)
        row.version += 1
        row.updated_at = utcnow()
        await session.flush()
        if (row.price, row.currency) != (old_price, old_currency):
            self._outbox.publish(
                session,
                ItemPriceChanged(
                    item_id=row.id,
                    old_price=old_price,
                    new_price=row.price,
                    old_currency=old_currency,
                    new_currency=row.currency,
                ),
            )
        on_commit(session, functools.partial(self._cache.invalidate, row.id))
        return _to_domain(row)

    async def delete(self, session: AsyncSession, item_id: uuid.UUID) -> None:
        """Remove an item from the catalog."""
        row = await self._items.get(session, item_id, for_update=True)
        if row is None:
            raise ItemNotFound()
        await session.delete(row)
        await session.flush()
        on_commit(session, functools.partial(self._cache.invalidate, item_id))

    async def prices(
        self, session: AsyncSession, item_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, ItemPrice]:
        if not item_ids:
            return {}
        result = await session.execute(self._items.prices(item_ids))
        return {r.id: ItemPrice(r.id, r.name, r.price, r.currency) for r in result}


class ItemsFacadeImpl:
    """What other modules may ask of items (see ``public.ItemsFacade``)."""

    def __init__(self, service: ItemService) -> None:
        self._service = service

    async def prices(
        self, session: AsyncSession, item_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, ItemPrice]:
        return await self._service.prices(session, item_ids)
