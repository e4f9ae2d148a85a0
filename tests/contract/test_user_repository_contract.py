"""The users repository behaves the same on SQLite and on PostgreSQL.

Every test runs twice (the ``session`` fixture is parametrized over both databases) inside a
transaction that is rolled back afterwards; nothing here commits. Emails are unique per test so
rows that other suites may have left in the shared databases can never match.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import false
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession

from modules.users.domain import normalize_email
from modules.users.models import UserRow
from modules.users.repository import UserRepository


@pytest.fixture
def repo() -> UserRepository:
    return UserRepository()


def _email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@contract.test"


def _row(email: str | None = None, **overrides: object) -> UserRow:
    values: dict[str, object] = {
        "email": email or _email(),
        "password_hash": "$argon2id$not-a-real-hash",
        "full_name": "Ada Lovelace",
        "age": 36,
    }
    values.update(overrides)
    return UserRow(**values)


async def _reload(session: AsyncSession, repo: UserRepository, user_id: uuid.UUID) -> UserRow | None:
    """Read the row back from the database, not from the session's identity map."""
    session.expunge_all()
    return await repo.get(session, user_id)


class TestAdd:
    async def test_add_flushes_and_get_reads_every_column_back(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        row = _row(full_name="Grace Hopper", age=85, is_admin=True)
        added = await repo.add(session, row)
        assert added is row
        assert isinstance(row.id, uuid.UUID)
        assert row.id.version == 7
        assert row.created_at is not None

        loaded = await _reload(session, repo, row.id)

        assert loaded is not None
        assert loaded is not row
        assert isinstance(loaded.id, uuid.UUID)
        assert (loaded.id, loaded.email, loaded.password_hash, loaded.full_name, loaded.age,
                loaded.is_admin) == (row.id, row.email, row.password_hash, "Grace Hopper", 85, True)

    async def test_defaults_are_applied(self, session: AsyncSession, repo: UserRepository) -> None:
        before = datetime.now(UTC)
        row = await repo.add(session, _row())
        loaded = await _reload(session, repo, row.id)

        assert loaded is not None
        assert loaded.is_admin is False
        assert before - timedelta(seconds=1) <= loaded.created_at <= datetime.now(UTC) + timedelta(seconds=1)

    async def test_created_at_comes_back_timezone_aware_utc(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        row = await repo.add(session, _row())
        loaded = await _reload(session, repo, row.id)

        assert loaded is not None
        assert loaded.created_at.tzinfo is not None
        assert loaded.created_at.utcoffset() == timedelta(0)
        assert loaded.created_at == row.created_at  # microseconds survive on both backends

    async def test_an_aware_non_utc_time_is_stored_as_the_same_instant_in_utc(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        cest = datetime(2024, 5, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        row = await repo.add(session, _row(created_at=cest))
        loaded = await _reload(session, repo, row.id)

        assert loaded is not None
        assert loaded.created_at == cest
        assert loaded.created_at.utcoffset() == timedelta(0)
        assert (loaded.created_at.hour, loaded.created_at.microsecond) == (12, 123456)

    async def test_a_naive_datetime_is_refused(self, session: AsyncSession, repo: UserRepository) -> None:
        with pytest.raises(StatementError) as caught:
            async with session.begin_nested():
                await repo.add(session, _row(created_at=datetime(2024, 5, 1, 12, 0)))
        assert isinstance(caught.value.orig, ValueError)
        assert "naive" in str(caught.value.orig)


class TestGet:
    async def test_unknown_id_is_none(self, session: AsyncSession, repo: UserRepository) -> None:
        await repo.add(session, _row())
        assert await repo.get(session, uuid.uuid4()) is None

    async def test_known_id_is_that_row(self, session: AsyncSession, repo: UserRepository) -> None:
        first = await repo.add(session, _row())
        second = await repo.add(session, _row())
        loaded = await _reload(session, repo, second.id)
        assert loaded is not None
        assert loaded.id == second.id != first.id
        assert loaded.email == second.email


class TestByEmail:
    async def test_finds_the_row_with_the_normalized_email(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        local = uuid.uuid4().hex[:12]
        wanted = await repo.add(session, _row(email=f"ann-{local}@example.com"))
        await repo.add(session, _row(email=f"bob-{local}@example.com"))
        session.expunge_all()

        found = await repo.one_or_none(session, repo.by_email(normalize_email(f"  Ann-{local}@Example.COM ")))

        assert found is not None
        assert found.id == wanted.id
        assert found.email == f"ann-{local}@example.com"

    async def test_does_not_find_other_addresses(self, session: AsyncSession, repo: UserRepository) -> None:
        local = uuid.uuid4().hex[:12]
        await repo.add(session, _row(email=f"ann-{local}@example.com"))

        for other in (f"ann-{local}@example.org", f"nn-{local}@example.com", f"ann-{local}@example.co"):
            assert await repo.one_or_none(session, repo.by_email(other)) is None

    async def test_matches_exactly_so_callers_must_normalize(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        """Both databases compare case-sensitively: normalization is the caller's job, everywhere."""
        local = uuid.uuid4().hex[:12]
        await repo.add(session, _row(email=f"ann-{local}@example.com"))

        assert await repo.one_or_none(session, repo.by_email(f"ANN-{local}@EXAMPLE.COM")) is None


class TestUniqueEmail:
    async def test_a_second_row_with_the_same_email_raises_integrity_error_on_flush(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        email = _email("dup")
        first = await repo.add(session, _row(email=email, full_name="First"))

        with pytest.raises(IntegrityError):
            async with session.begin_nested():  # as the service does: only the savepoint is lost
                await repo.add(session, _row(email=email, full_name="Second"))

        survivors = await repo.all(session, repo.by_email(email))
        assert [(u.id, u.full_name) for u in survivors] == [(first.id, "First")]

    async def test_different_emails_do_not_collide(self, session: AsyncSession, repo: UserRepository) -> None:
        local = uuid.uuid4().hex[:12]
        await repo.add(session, _row(email=f"a-{local}@contract.test"))
        await repo.add(session, _row(email=f"b-{local}@contract.test"))
        assert len(await repo.all(session, repo.select().where(UserRow.email.like(f"%-{local}@%")))) == 2


class TestAll:
    async def test_returns_every_matching_row_as_a_list_in_statement_order(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        local = uuid.uuid4().hex[:12]
        emails = [f"{name}-{local}@contract.test" for name in ("carol", "alice", "bob")]
        for email in emails:
            await repo.add(session, _row(email=email))

        rows = await repo.all(
            session, repo.select().where(UserRow.email.in_(emails)).order_by(UserRow.email.desc())
        )

        assert isinstance(rows, list)
        assert all(isinstance(r, UserRow) for r in rows)
        assert [r.email for r in rows] == sorted(emails, reverse=True)

    async def test_unfiltered_select_includes_the_new_rows(
        self, session: AsyncSession, repo: UserRepository
    ) -> None:
        added = {(await repo.add(session, _row())).id for _ in range(3)}
        assert added <= {r.id for r in await repo.all(session, repo.select())}

    async def test_no_match_is_an_empty_list(self, session: AsyncSession, repo: UserRepository) -> None:
        await repo.add(session, _row())
        assert await repo.all(session, repo.select().where(false())) == []
