"""The items module's public face: price look-ups for other modules, and its events."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from core.messaging.events import IntegrationEvent


@dataclass(frozen=True, slots=True)
class ItemPrice:
    item_id: uuid.UUID
    name: str
    price: int  # minor units
    currency: str


class ItemsFacade(Protocol):
    async def prices(
        self, session: AsyncSession, item_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, ItemPrice]:
        """Current prices of the given items in one query; unknown ids are absent from the result."""
        ...


class ItemPriceChanged(IntegrationEvent):
    name = "items.ItemPriceChanged"

    item_id: uuid.UUID
    old_price: int
    new_price: int
    old_currency: str
    new_currency: str
