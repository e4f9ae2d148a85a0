"""Users use cases. Never commits: the request edge or the job's unit of work does."""

from __future__ import annotations

import uuid

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.edge.errors import NotFound, Unauthorized, Unprocessable
from core.messaging.outbox import Outbox
from core.security import PasswordHasher, Principal, TokenService
from modules.users.domain import EmailTaken, InvalidCredentials, User, check_password, normalize_email
from modules.users.models import UserRow
from modules.users.public import UserRegistered, UserSummary
from modules.users.repository import UserRepository


def _to_domain(row: UserRow) -> User:
    return User(row.id, row.email, row.full_name, row.age, row.is_admin, row.created_at)


class UserService:
    def __init__(
        self, repository: UserRepository, hasher: PasswordHasher, tokens: TokenService, outbox: Outbox
    ) -> None:
        self._users = repository
        self._hasher = hasher
        self._tokens = tokens
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
                      is_admin=is_admin)
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

    async def issue_token(self, session: AsyncSession, email: str, password: str) -> tuple[str, int]:
        """Check credentials and return ``(access_token, expires_in)``.

        Unknown emails cost one password verification too, so timing reveals nothing.
        """
        row = await self._users.one_or_none(session, self._users.by_email(normalize_email(email)))
        if row is None:
            await self._hasher.verify_dummy(password)
            raise InvalidCredentials()
        if not await self._hasher.verify_async(row.password_hash, password):
            raise InvalidCredentials()
        if self._hasher.needs_rehash(row.password_hash):
            row.password_hash = await self._hasher.hash_async(password)
        token = self._tokens.issue(Principal(row.id, row.is_admin))
        return token, self._tokens.ttl_seconds

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
