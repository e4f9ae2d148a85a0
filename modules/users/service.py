"""Users use cases. Never commits: the request edge or the job's unit of work does."""

from __future__ import annotations

import functools
import uuid
from datetime import timedelta
from typing import Any, cast

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.db.base import new_id, utcnow
from core.db.session import on_commit
from core.edge.errors import NotFound, Unauthorized, Unprocessable
from core.messaging.outbox import Outbox
from core.security import AccessClaims, InvalidToken, PasswordHasher, Principal, RefreshTokens, TokenService
from modules.users.authority import SessionAuthorities
from modules.users.domain import (
    ACCOUNT_DISABLED,
    LOGOUT,
    PASSWORD_CHANGED,
    REFRESH_REUSED,
    AccountDisabled,
    EmailTaken,
    InvalidCredentials,
    InvalidRefreshToken,
    RefreshTokenReused,
    SessionEnded,
    TokenPair,
    UnknownAccount,
    User,
    WrongPassword,
    check_password,
    normalize_email,
)
from modules.users.models import SessionRow, UserRow
from modules.users.public import UserRegistered, UserSummary
from modules.users.repository import SessionRepository, UserRepository


def _to_domain(row: UserRow) -> User:
    return User(row.id, row.email, row.full_name, row.age, row.is_admin, row.created_at)


class UserService:
    def __init__(
        self, repository: UserRepository, sessions: SessionRepository, hasher: PasswordHasher,
        tokens: TokenService, refresh_tokens: RefreshTokens, authority: SessionAuthorities, outbox: Outbox,
    ) -> None:
        self._users = repository
        self._sessions = sessions
        self._hasher = hasher
        self._tokens = tokens
        self._refresh = refresh_tokens
        self._authority = authority
        self._outbox = outbox

    async def register(
        self, session: AsyncSession, email: str, password: str, full_name: str, age: int,
        *, is_admin: bool = False,
    ) -> User:
        """Create an account and record ``UserRegistered`` (the welcome email follows by job)."""
        email = normalize_email(email)
        if await self._users.one_or_none(session, self._users.by_email(email)) is not None:
            raise EmailTaken()
        password_hash = await self._hasher.hash_async(password)
        row = UserRow(email=email, password_hash=password_hash, full_name=full_name, age=age,
                      is_admin=is_admin, is_active=True)
        try:
            async with session.begin_nested():  # a racing signup loses here, not at commit
                await self._users.add(session, row)
        except IntegrityError:
            raise EmailTaken() from None
        self._outbox.publish(session, UserRegistered(user_id=row.id, email=row.email, full_name=full_name))
        return _to_domain(row)

    async def create_admin(self, session: AsyncSession, email: str, password: str, full_name: str) -> User:
        """Create an administrator (CLI only; there is no public route for it)."""
        check_password(password)
        try:
            email = validate_email(email, check_deliverability=False).normalized
        except EmailNotValidError as exc:
            raise Unprocessable(f"Invalid email address: {exc}", code="invalid_email") from None
        return await self.register(session, email, password, full_name, age=18, is_admin=True)

    # --- sessions ------------------------------------------------------------------------------

    async def issue_token(self, session: AsyncSession, email: str, password: str) -> TokenPair:
        """Check credentials and open a session: an access token and the session's refresh token.

        Unknown emails cost one password verification too, so timing reveals nothing.
        """
        row = await self._users.one_or_none(session, self._users.by_email(normalize_email(email)))
        if row is None:
            await self._hasher.verify_dummy(password)
            raise InvalidCredentials()
        if not await self._hasher.verify_async(row.password_hash, password):
            raise InvalidCredentials()
        if not row.is_active:
            raise AccountDisabled()  # only once the password is known to be right
        if self._hasher.needs_rehash(row.password_hash):
            row.password_hash = await self._hasher.hash_async(password)
        now = utcnow()
        opened = SessionRow(id=new_id(), user_id=row.id, generation=0, created_at=now, last_used_at=now,
                            expires_at=now + timedelta(seconds=self._refresh.ttl_seconds))
        await self._sessions.add(session, opened)
        return self._pair(row.id, opened.id, 0)

    async def refresh(self, session: AsyncSession, refresh_token: str) -> TokenPair | RefreshTokenReused:
        """Rotate the session's refresh token: a new pair, and the presented token is spent.

        A spent token presented again (also the loser of two concurrent uses of one token) ends
        the whole session: that refusal is *returned*, as its revocation must be committed.
        """
        try:
            session_id, generation = self._refresh.read(refresh_token)
        except InvalidToken:
            raise InvalidRefreshToken() from None
        found = (await session.execute(self._sessions.with_account(session_id))).first()
        if found is None:
            raise InvalidRefreshToken()  # signed by us, but the session is gone (account deleted)
        row, active = found
        if not active:
            raise Unauthorized("This account is disabled.", code=ACCOUNT_DISABLED)
        if row.revoked_at is not None:
            if row.revoked_reason == REFRESH_REUSED:
                raise RefreshTokenReused()
            raise SessionEnded(row.revoked_reason or "revoked")
        now = utcnow()
        if row.expires_at <= now:
            raise SessionEnded("expired")
        expires_at = now + timedelta(seconds=self._refresh.ttl_seconds)
        if generation == row.generation:
            rotated = (await session.execute(self._sessions.rotate(session_id, generation, now, expires_at)))
            if rotated.scalar_one_or_none() is not None:
                return self._pair(row.user_id, session_id, generation + 1)
        await self._end(session, self._sessions.revoke(SessionRow.id == session_id, now=now,
                                                       reason=REFRESH_REUSED))
        return RefreshTokenReused()

    async def logout(self, session: AsyncSession, principal: Principal) -> None:
        """End the caller's session: its refresh token and access tokens stop working."""
        if principal.session_id is not None:
            await self._end(session, self._sessions.revoke(SessionRow.id == principal.session_id,
                                                           now=utcnow(), reason=LOGOUT))

    async def change_password(
        self, session: AsyncSession, principal: Principal, current: str, new: str
    ) -> None:
        """Replace the caller's password; every other session of the account ends."""
        row = await self._users.get(session, principal.user_id, for_update=True)
        if row is None:
            raise Unauthorized("The account of this token no longer exists.", code="invalid_token")
        if not await self._hasher.verify_async(row.password_hash, current):
            raise WrongPassword()
        check_password(new)
        row.password_hash = await self._hasher.hash_async(new)
        others = [SessionRow.user_id == row.id]
        if principal.session_id is not None:
            others.append(SessionRow.id != principal.session_id)
        await self._end(session, self._sessions.revoke(*others, now=utcnow(), reason=PASSWORD_CHANGED))

    async def purge_sessions(self, session: AsyncSession, retention_days: float) -> int:
        """Delete the sessions that ended (expired, or were revoked) more than ``retention_days``
        ago; how many. Until then a spent or revoked refresh token is answered by what ended its
        session (``session_ended``, ``refresh_token_reused``); afterwards as an unknown session."""
        cutoff = utcnow() - timedelta(days=retention_days)
        result = cast("CursorResult[Any]", await session.execute(self._sessions.ended_before(cutoff)))
        return int(result.rowcount or 0)

    def _pair(self, user_id: uuid.UUID, session_id: uuid.UUID, generation: int) -> TokenPair:
        return TokenPair(
            access_token=self._tokens.issue(AccessClaims(user_id, session_id)),
            expires_in=self._tokens.ttl_seconds,
            refresh_token=self._refresh.issue(session_id, generation),
            refresh_expires_in=self._refresh.ttl_seconds,
        )

    async def _end(self, session: AsyncSession, revoke: Any) -> int:
        """Run a revoking statement; after commit, the caches forget the sessions it ended."""
        ended = list((await session.execute(revoke)).scalars())
        self._forget_after_commit(session, ended)
        return len(ended)

    def _forget_after_commit(self, session: AsyncSession, session_ids: list[uuid.UUID]) -> None:
        if session_ids:
            on_commit(session, functools.partial(self._authority.forget, session_ids))

    # --- administration (CLI) ------------------------------------------------------------------

    async def set_active(self, session: AsyncSession, email: str, active: bool) -> str:
        """Enable or disable an account; disabling ends its sessions. Returns a line for the operator."""
        row = await self._locked(session, email)
        row.is_active = active
        ended = 0
        if not active:
            ended = await self._end(session, self._sessions.revoke(
                SessionRow.user_id == row.id, now=utcnow(), reason=ACCOUNT_DISABLED))
        await self._forget_account(session, row.id)
        if active:
            return f"enabled: {row.email}"
        return f"disabled: {row.email} ({ended} session{'' if ended == 1 else 's'} ended)"

    async def set_admin(self, session: AsyncSession, email: str, is_admin: bool) -> str:
        """Grant or revoke the administrator role; live tokens follow. Returns a line for the operator."""
        row = await self._locked(session, email)
        row.is_admin = is_admin
        await self._forget_account(session, row.id)
        return f"{'administrator' if is_admin else 'not an administrator'}: {row.email}"

    async def _locked(self, session: AsyncSession, email: str) -> UserRow:
        # FOR UPDATE: a sign-in inserting a session (whose foreign key locks this row too) finishes
        # first or waits, so the sessions listed for invalidation below are all there are.
        normalized = normalize_email(email)
        row = await self._users.one_or_none(session, self._users.by_email(normalized).with_for_update())
        if row is None:
            raise UnknownAccount(normalized)
        return row

    async def _forget_account(self, session: AsyncSession, user_id: uuid.UUID) -> None:
        """After commit, the caches forget every session of the account: they hold its role and state."""
        ids = list((await session.execute(self._sessions.current_of(user_id, utcnow()))).scalars())
        self._forget_after_commit(session, ids)

    # --- reads ---------------------------------------------------------------------------------

    async def me(self, session: AsyncSession, principal: Principal) -> User:
        """The caller's own account; a token for a deleted account is no longer valid."""
        row = await self._users.get(session, principal.user_id)
        if row is None:
            raise Unauthorized("The account of this token no longer exists.", code="invalid_token")
        return _to_domain(row)

    async def get_visible(
        self, session: AsyncSession, principal: Principal, user_id: uuid.UUID,
        *, confirm_on: AsyncSession | None = None,
    ) -> User:
        """A user the caller may see: themselves, or anyone for an admin; 404 otherwise.

        ``session`` may be a read replica's; a user it does not have (a signup it has not replayed
        yet) is looked up again on ``confirm_on``, the primary, before answering 404.
        """
        if user_id != principal.user_id and not principal.is_admin:
            raise NotFound("User not found.")
        row = await self._users.get(session, user_id)
        if row is None and confirm_on is not None and confirm_on is not session:
            row = await self._users.get(confirm_on, user_id)
        if row is None:
            raise NotFound("User not found.")
        return _to_domain(row)

    async def summary(self, session: AsyncSession, user_id: uuid.UUID) -> UserSummary | None:
        row = await self._users.get(session, user_id)
        return None if row is None else UserSummary(row.id, row.email, row.full_name, row.is_admin)


class UsersFacadeImpl:
    """What other modules may ask of users (see ``public.UsersFacade``)."""

    def __init__(self, service: UserService) -> None:
        self._service = service

    async def get_user(self, session: AsyncSession, user_id: uuid.UUID) -> UserSummary | None:
        return await self._service.summary(session, user_id)
