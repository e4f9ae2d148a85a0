"""Statements over the users and user_sessions tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Delete, Select, Update, bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.repository import Repository
from core.db.statements import DirectRead
from modules.users.models import SessionRow, UserRow

_s, _u = SessionRow.__table__.c, UserRow.__table__.c
# What every authenticated request needs of its session (an L1/L2 miss, modules/users/authority.py):
# one primary-key join, compiled once, in autocommit (core.db.statements.DirectRead).
_AUTHORITY = DirectRead(
    select(_s.user_id, _s.revoked_at, _u.is_admin, _u.is_active)
    .join_from(SessionRow.__table__, UserRow.__table__, _s.user_id == _u.id)
    .where(_s.id == bindparam("session_id"))
)
# Core statements: the ORM need not look for these rows among the session's objects.
_NO_SYNC = {"synchronize_session": False}


class UserRepository(Repository[UserRow]):
    model = UserRow

    def by_email(self, normalized_email: str) -> Select[UserRow]:
        return self.select().where(UserRow.email == normalized_email)


class SessionRepository(Repository[SessionRow]):
    model = SessionRow

    async def authority(self, engine: AsyncEngine, session_id: uuid.UUID) -> Any | None:
        """``user_id``, ``revoked_at``, ``is_admin``, ``is_active`` of a session (a mapping) or None."""
        return await _AUTHORITY.one(engine, session_id=session_id)

    def with_account(self, session_id: uuid.UUID) -> Select[SessionRow, bool]:
        """The session and whether its account is enabled."""
        return (select(SessionRow, UserRow.is_active).join(UserRow, UserRow.id == SessionRow.user_id)
                .where(SessionRow.id == session_id))

    def rotate(self, session_id: uuid.UUID, generation: int, now: datetime, expires_at: datetime) -> Update:
        """Compare-and-set the next generation: returns the user id only if ``generation`` was
        still the current one of a live session (of two uses of one refresh token, one wins)."""
        return (update(SessionRow)
                .where(SessionRow.id == session_id, SessionRow.generation == generation,
                       SessionRow.revoked_at.is_(None))
                .values(generation=generation + 1, last_used_at=now, expires_at=expires_at)
                .returning(SessionRow.user_id).execution_options(**_NO_SYNC))

    def revoke(self, *criteria: Any, now: datetime, reason: str) -> Update:
        """End the live sessions matching ``criteria``; returns their ids."""
        return (update(SessionRow).where(*criteria, SessionRow.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
                .returning(SessionRow.id).execution_options(**_NO_SYNC))

    def ended_before(self, cutoff: datetime) -> Delete:
        """Delete the sessions that expired or were revoked before ``cutoff``."""
        return (delete(SessionRow)
                .where(or_(SessionRow.expires_at < cutoff, SessionRow.revoked_at < cutoff))
                .execution_options(**_NO_SYNC))

    def current_of(self, user_id: uuid.UUID, now: datetime) -> Select[uuid.UUID]:
        """Ids of the user's sessions that have not expired (revoked or not): what a change of the
        account must invalidate in the caches."""
        return select(SessionRow.id).where(SessionRow.user_id == user_id, SessionRow.expires_at > now)
