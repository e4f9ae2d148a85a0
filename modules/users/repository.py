"""Statements over the users table."""

from __future__ import annotations

from sqlalchemy import Select

from core.db.repository import Repository
from modules.users.models import UserRow


class UserRepository(Repository[UserRow]):
    model = UserRow

    def by_email(self, normalized_email: str) -> Select[UserRow]:
        return self.select().where(UserRow.email == normalized_email)
