"""The users module's public face: the only names other modules may import."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from core.messaging.events import IntegrationEvent


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: uuid.UUID
    email: str
    full_name: str
    is_admin: bool


class UsersFacade(Protocol):
    async def get_user(self, session: AsyncSession, user_id: uuid.UUID) -> UserSummary | None:
        """The user with this id, or None."""
        ...


class UserRegistered(IntegrationEvent):
    name = "users.UserRegistered"

    user_id: uuid.UUID
    email: str
    full_name: str
