"""The idempotency store behaves the same on SQLite and on PostgreSQL.

``claim`` and ``release`` commit their own transactions, so these tests use committed data in a
private migrated database per backend (emptied before each test) through a production-configured
``async_sessionmaker``, not the rollback-isolated ``session`` fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.edge.errors import BadRequest
from core.edge.idempotency import (
    COMPLETED,
    IN_FLIGHT,
    Claim,
    IdempotencyClaimLost,
    IdempotencyKey,
    IdempotencyKeyReused,
    IdempotencyRequestInProgress,
    IdempotencyStore,
    StoredResponse,
    check_key,
    fingerprint,
    run_once,
)
from tests.support.db import migrated

SCOPE = "billing.payments"
FP = fingerprint("POST", "/api/v1/invoices/1/payments", b'{"payment_token": "tok_1"}')
OTHER_FP = fingerprint("POST", "/api/v1/invoices/1/payments", b'{"payment_token": "tok_2"}')
ACCEPTED = StoredResponse(status=202, body={"id": "p-1", "status": "pending", "amounts": [1, 2]})
CREATED = StoredResponse(status=201, body={"id": "p-2"})
LEASE, TTL = 30, 3600  # the leased_store fixture: a lease much shorter than the key's lifetime


class Clock:
    """An injectable clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def idempotency_database(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_database_factory: Callable[[], Awaitable[str]],
) -> tuple[str, str]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("idempotency") / "idempotency.db"
        return "sqlite", await migrated(f"sqlite+aiosqlite:///{path}")
    return "postgres", await migrated(await pg_database_factory())


@pytest.fixture
async def sessions(idempotency_database: tuple[str, str]) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions configured as in production, on an emptied key table."""
    engine = create_engine(idempotency_database[1], pool_size=20, max_overflow=40)
    factory = session_factory(engine)
    async with UnitOfWork(factory) as session:
        await session.execute(delete(IdempotencyKey))
    yield factory
    await engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(sessions: async_sessionmaker[AsyncSession], clock: Clock) -> IdempotencyStore:
    """Lease and TTL equal (60 s): an in-flight and a completed key expire alike."""
    return IdempotencyStore(sessions, ttl_seconds=60, lease_seconds=60, wait_seconds=2.0, poll_interval=0.01,
                            clock=clock)


@pytest.fixture
def leased_store(sessions: async_sessionmaker[AsyncSession], clock: Clock) -> IdempotencyStore:
    """A 30 s lease and a one-hour TTL; a duplicate of an in-flight request gives up after 0.1 s."""
    return IdempotencyStore(sessions, ttl_seconds=TTL, lease_seconds=LEASE, wait_seconds=0.1,
                            poll_interval=0.01, clock=clock)


@pytest.fixture
async def committed(idempotency_database: tuple[str, str]) -> AsyncIterator[
        Callable[[str], Awaitable[tuple[str, str, int | None] | None]]]:
    """``(state, owner, response_status)`` of a key as other connections see it, or None.

    A plain engine: a production SQLite session starts with BEGIN IMMEDIATE and would wait for
    the write lock of a caller whose transaction is still open; this one reads the last commit.
    """
    engine = create_async_engine(idempotency_database[1])

    async def read(key: str) -> tuple[str, str, int | None] | None:
        async with engine.connect() as connection:
            row = (await connection.execute(
                select(IdempotencyKey.state, IdempotencyKey.owner, IdempotencyKey.response_status)
                .where(IdempotencyKey.scope == SCOPE, IdempotencyKey.key == key)
            )).one_or_none()
        return None if row is None else (row.state, row.owner, row.response_status)

    yield read
    await engine.dispose()


@pytest.fixture
async def impatient_store(
    idempotency_database: tuple[str, str], sessions: async_sessionmaker[AsyncSession], clock: Clock
) -> AsyncIterator[IdempotencyStore]:
    """``leased_store`` on an engine whose SQLite connections wait 0.2 s for a lock, not 30 s.

    For the ``run_once`` paths that release while the caller's transaction is open: on SQLite
    that transaction holds the database's write lock, so the release can only time out (see
    ``TestRunOnce``); a short timeout keeps those tests fast. PostgreSQL is unaffected.
    """
    backend, url = idempotency_database  # ``sessions`` emptied the table
    engine = create_engine(url, pool_size=20, max_overflow=40)
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _short_sqlite_busy_timeout)
    yield IdempotencyStore(session_factory(engine), ttl_seconds=TTL, lease_seconds=LEASE, wait_seconds=0.1,
                           poll_interval=0.01, clock=clock)
    await engine.dispose()


def _short_sqlite_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 200")
    cursor.close()


async def _claim(store: IdempotencyStore, key: str, fp: str = FP, scope: str = SCOPE) -> Claim:
    """Claim a key that must be free (or expired): the caller owns it."""
    claim = await store.claim(scope, key, fp)
    assert isinstance(claim, Claim), claim
    assert (claim.scope, claim.key) == (scope, key)
    return claim


async def _complete(sessions: async_sessionmaker[AsyncSession], store: IdempotencyStore, claim: Claim,
                    response: StoredResponse = ACCEPTED) -> None:
    async with UnitOfWork(sessions) as session:
        await store.complete(session, claim, response)


async def _row(sessions: async_sessionmaker[AsyncSession], key: str,
               scope: str = SCOPE) -> IdempotencyKey | None:
    async with sessions() as session:
        return await session.get(IdempotencyKey, (scope, key))


class TestClaim:
    async def test_the_first_claim_owns_the_key(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        claim = await store.claim(SCOPE, "k1", FP)

        assert isinstance(claim, Claim)
        assert (claim.scope, claim.key) == (SCOPE, "k1")
        assert len(claim.owner) == 32
        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.fingerprint, row.owner, row.response_status) == (
            IN_FLIGHT, FP, claim.owner, None)
        assert row.created_at == clock.now
        assert row.expires_at == clock.now + timedelta(seconds=60)

    async def test_a_completed_key_replays_its_response(self, store: IdempotencyStore,
                                                        sessions: async_sessionmaker[AsyncSession]) -> None:
        claim = await _claim(store, "k1")
        await _complete(sessions, store, claim)

        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED

    async def test_another_fingerprint_is_refused_while_in_flight_and_after_completion(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        claim = await _claim(store, "k1")
        with pytest.raises(IdempotencyKeyReused) as in_flight:
            await store.claim(SCOPE, "k1", OTHER_FP)
        await _complete(sessions, store, claim)
        with pytest.raises(IdempotencyKeyReused) as completed:
            await store.claim(SCOPE, "k1", OTHER_FP)

        assert in_flight.value.status == completed.value.status == 422
        assert completed.value.code == "idempotency_key_reused"
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED

    async def test_an_in_flight_key_times_out_as_in_progress(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        store = IdempotencyStore(sessions, wait_seconds=0.1, poll_interval=0.01, clock=clock)
        await _claim(store, "k1")

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(IdempotencyRequestInProgress) as caught:
            await store.claim(SCOPE, "k1", FP)

        assert caught.value.status == 409
        assert caught.value.code == "idempotency_request_in_progress"
        assert 0.1 <= loop.time() - started < 2.0

    async def test_a_waiter_gets_the_response_once_the_owner_completes(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        claim = await _claim(store, "k1")
        waiter = asyncio.create_task(store.claim(SCOPE, "k1", FP))
        await asyncio.sleep(0.1)
        assert not waiter.done()

        await _complete(sessions, store, claim)

        assert await asyncio.wait_for(waiter, 5) == ACCEPTED

    async def test_a_waiter_claims_the_key_when_the_owner_releases_it(self, store: IdempotencyStore) -> None:
        first = await _claim(store, "k1")
        waiter = asyncio.create_task(store.claim(SCOPE, "k1", FP))
        await asyncio.sleep(0.05)

        await store.release(first)

        second = await asyncio.wait_for(waiter, 5)
        assert isinstance(second, Claim)
        assert second.owner != first.owner

    async def test_an_expired_key_is_claimed_again(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        await _complete(sessions, store, await _claim(store, "done"))
        stuck = await _claim(store, "stuck")

        clock.advance(61)

        again = await _claim(store, "done", OTHER_FP)  # another body is fine once expired
        assert (await _claim(store, "stuck")).owner != stuck.owner
        row = await _row(sessions, "done")
        assert row is not None
        assert (row.state, row.fingerprint, row.owner, row.response_status, row.response_body) == (
            IN_FLIGHT, OTHER_FP, again.owner, None, None)
        assert row.expires_at == clock.now + timedelta(seconds=60)

    async def test_a_key_not_yet_expired_is_not_taken_over(
        self, store: IdempotencyStore, clock: Clock
    ) -> None:
        await _claim(store, "k1")
        clock.advance(59)

        with pytest.raises(IdempotencyKeyReused):
            await store.claim(SCOPE, "k1", OTHER_FP)

    async def test_scopes_are_independent(self, store: IdempotencyStore,
                                          sessions: async_sessionmaker[AsyncSession]) -> None:
        await _complete(sessions, store, await _claim(store, "k1"))

        await _claim(store, "k1", OTHER_FP, scope="other.scope")
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED


class TestLease:
    async def test_an_in_flight_claim_waits_until_its_lease_runs_out_then_is_taken_over(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        first = await _claim(leased_store, "k1")
        assert (row := await _row(sessions, "k1")) is not None
        assert row.expires_at == clock.now + timedelta(seconds=LEASE)  # the lease, not the TTL

        clock.advance(LEASE - 1)
        with pytest.raises(IdempotencyRequestInProgress):
            await leased_store.claim(SCOPE, "k1", FP)

        clock.advance(2)
        second = await _claim(leased_store, "k1")

        assert second.owner != first.owner
        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.fingerprint, row.owner) == (IN_FLIGHT, FP, second.owner)
        assert (row.created_at, row.expires_at) == (clock.now, clock.now + timedelta(seconds=LEASE))

    async def test_a_waiter_takes_the_key_over_when_the_lease_runs_out_during_its_wait(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        store = IdempotencyStore(sessions, ttl_seconds=TTL, lease_seconds=LEASE, wait_seconds=5.0,
                                 poll_interval=0.01, clock=clock)
        first = await _claim(store, "k1")
        waiter = asyncio.create_task(store.claim(SCOPE, "k1", FP))
        await asyncio.sleep(0.1)
        assert not waiter.done()

        clock.advance(LEASE + 1)

        second = await asyncio.wait_for(waiter, 5)
        assert isinstance(second, Claim)
        assert second.owner != first.owner

    async def test_another_fingerprint_may_take_over_an_expired_lease(
        self, leased_store: IdempotencyStore, clock: Clock
    ) -> None:
        await _claim(leased_store, "k1")
        with pytest.raises(IdempotencyKeyReused):
            await leased_store.claim(SCOPE, "k1", OTHER_FP)

        clock.advance(LEASE + 1)

        await _claim(leased_store, "k1", OTHER_FP)

    async def test_a_completed_key_lives_for_the_ttl_counted_from_completion(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        claim = await _claim(leased_store, "k1")
        clock.advance(20)
        completed_at = clock.now
        await _complete(sessions, leased_store, claim)
        assert (row := await _row(sessions, "k1")) is not None
        assert row.expires_at == completed_at + timedelta(seconds=TTL)

        clock.advance(LEASE)  # past the lease
        assert await leased_store.claim(SCOPE, "k1", FP) == ACCEPTED
        clock.advance(TTL - LEASE - 20 + 1)  # past the TTL counted from the claim
        assert await leased_store.claim(SCOPE, "k1", FP) == ACCEPTED
        with pytest.raises(IdempotencyKeyReused):
            await leased_store.claim(SCOPE, "k1", OTHER_FP)

        clock.advance(20)  # past the TTL counted from completion
        await _claim(leased_store, "k1", OTHER_FP)


class TestOwner:
    async def test_each_claim_has_its_own_owner(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        first = await _claim(leased_store, "k1")
        other_key = await _claim(leased_store, "k2")
        await leased_store.release(first)
        again = await _claim(leased_store, "k1")

        assert len({first.owner, other_key.owner, again.owner}) == 3

    async def test_a_forged_claim_can_neither_complete_nor_release(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        claim = await _claim(leased_store, "k1")
        forged = Claim(SCOPE, "k1", "0" * 32)

        with pytest.raises(IdempotencyClaimLost):
            await _complete(sessions, leased_store, forged)
        await leased_store.release(forged)

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner) == (IN_FLIGHT, claim.owner)

    async def test_after_a_takeover_the_first_claimant_can_neither_complete_nor_release(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        first = await _claim(leased_store, "k1")
        clock.advance(LEASE + 1)
        second = await _claim(leased_store, "k1")

        with pytest.raises(IdempotencyClaimLost) as lost:
            await _complete(sessions, leased_store, first, ACCEPTED)

        assert lost.value.status == 409
        assert lost.value.code == "idempotency_claim_lost"
        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner, row.response_status, row.response_body) == (
            IN_FLIGHT, second.owner, None, None)

        await leased_store.release(first)

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner) == (IN_FLIGHT, second.owner)
        with pytest.raises(IdempotencyRequestInProgress):
            await leased_store.claim(SCOPE, "k1", FP)

        await _complete(sessions, leased_store, second, CREATED)

        assert await leased_store.claim(SCOPE, "k1", FP) == CREATED
        with pytest.raises(IdempotencyClaimLost):  # and not over the second's response either
            await _complete(sessions, leased_store, first, ACCEPTED)
        await leased_store.release(first)
        assert await leased_store.claim(SCOPE, "k1", FP) == CREATED


class TestComplete:
    async def test_the_response_is_stored_in_the_callers_transaction(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        claim = await _claim(store, "k1")
        async with UnitOfWork(sessions) as session:
            await store.complete(session, claim, StoredResponse(status=201, body=None))

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner, row.response_status, row.response_body) == (
            COMPLETED, claim.owner, 201, None)
        assert await store.claim(SCOPE, "k1", FP) == StoredResponse(status=201, body=None)

    async def test_a_rolled_back_completion_leaves_the_key_in_flight(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        claim = await _claim(store, "k1")

        async def use_case_that_fails_after_completing() -> None:
            async with UnitOfWork(sessions) as session:
                await store.complete(session, claim, ACCEPTED)
                raise RuntimeError("use case failed")

        with pytest.raises(RuntimeError, match="use case failed"):
            await use_case_that_fails_after_completing()

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner) == (IN_FLIGHT, claim.owner)
        await store.release(claim)
        await _claim(store, "k1")

    async def test_completing_an_unclaimed_key_fails(self, store: IdempotencyStore,
                                                     sessions: async_sessionmaker[AsyncSession]) -> None:
        with pytest.raises(IdempotencyClaimLost):
            await _complete(sessions, store, Claim(SCOPE, "never-claimed", "0" * 32))

        assert await _row(sessions, "never-claimed") is None

    async def test_completing_twice_fails(self, store: IdempotencyStore,
                                          sessions: async_sessionmaker[AsyncSession]) -> None:
        claim = await _claim(store, "k1")
        await _complete(sessions, store, claim, ACCEPTED)

        with pytest.raises(IdempotencyClaimLost):
            await _complete(sessions, store, claim, CREATED)

        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED


class TestRelease:
    async def test_a_released_key_can_be_claimed_again(self, store: IdempotencyStore,
                                                       sessions: async_sessionmaker[AsyncSession]) -> None:
        claim = await _claim(store, "k1")

        await store.release(claim)

        assert await _row(sessions, "k1") is None
        await _claim(store, "k1", OTHER_FP)

    async def test_release_keeps_a_completed_response(self, store: IdempotencyStore,
                                                      sessions: async_sessionmaker[AsyncSession]) -> None:
        claim = await _claim(store, "k1")
        await _complete(sessions, store, claim)

        await store.release(claim)

        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED


class TestPurgeExpired:
    async def test_only_expired_rows_are_deleted_and_counted(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        await _claim(store, "old-1")
        await _complete(sessions, store, await _claim(store, "old-2"))
        clock.advance(30)
        await _claim(store, "new")
        clock.advance(31)

        assert await store.purge_expired() == 2
        assert await store.purge_expired() == 0
        async with sessions() as session:
            keys = (await session.scalars(select(IdempotencyKey.key))).all()
        assert keys == ["new"]


VISIBLE_ASCII = "".join(chr(code) for code in range(ord("!"), ord("~") + 1))


class TestCheckKey:
    @pytest.mark.parametrize("key", [None, ""])
    def test_a_missing_key_is_required(self, key: str | None) -> None:
        with pytest.raises(BadRequest) as caught:
            check_key(key)

        assert caught.value.status == 400
        assert caught.value.code == "idempotency_key_required"

    @pytest.mark.parametrize("key", [
        "k" * 256,
        VISIBLE_ASCII * 3,  # 282 characters
        "two words",
        " leading",
        "trailing ",
        " ",
        "clé",
        "ключ",
        "tab\there",
        "new\nline",
        "nul\x00",
        "del\x7f",
        "nbsp\u00a0",
    ])
    def test_a_key_too_long_or_outside_visible_ascii_is_invalid(self, key: str) -> None:
        with pytest.raises(BadRequest) as caught:
            check_key(key)

        assert caught.value.status == 400
        assert caught.value.code == "invalid_idempotency_key"

    @pytest.mark.parametrize("key", [
        "k" * 255,
        (VISIBLE_ASCII * 3)[:255],
        "!",
        "~",
        "0b6f1c2e-7d4a-4c55-9a43-3f1e2d9c8b7a",
    ])
    def test_a_key_of_1_to_255_visible_ascii_characters_is_returned_unchanged(self, key: str) -> None:
        assert check_key(key) == key


class Action:
    """A use case for ``run_once``: counts its runs, answers ``response`` or raises ``error``."""

    def __init__(self, response: StoredResponse = ACCEPTED, error: Exception | None = None) -> None:
        self.response, self.error, self.runs = response, error, 0
        self.during: Callable[[], Awaitable[None]] | None = None

    async def __call__(self) -> StoredResponse:
        self.runs += 1
        if self.during is not None:
            await self.during()
        if self.error is not None:
            raise self.error
        return self.response


async def _run_once(sessions: async_sessionmaker[AsyncSession], store: IdempotencyStore, key: str,
                    action: Action, fp: str = FP) -> tuple[StoredResponse, bool]:
    """``run_once`` in the caller's own transaction, committed when it returns."""
    async with UnitOfWork(sessions) as session:
        return await run_once(store, session, SCOPE, key, fp, action)


class TestRunOnce:
    async def test_the_action_runs_once_and_a_repeat_replays_its_response(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        action = Action(ACCEPTED)

        assert await _run_once(sessions, leased_store, "k1", action) == (ACCEPTED, False)
        assert action.runs == 1
        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.response_status, row.response_body) == (COMPLETED, 202, ACCEPTED.body)

        assert await _run_once(sessions, leased_store, "k1", action) == (ACCEPTED, True)
        assert await _run_once(sessions, leased_store, "k1", Action(CREATED)) == (ACCEPTED, True)
        assert action.runs == 1

    async def test_another_fingerprint_is_refused_without_running_the_action(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _run_once(sessions, leased_store, "k1", Action(ACCEPTED))
        action = Action(CREATED)

        with pytest.raises(IdempotencyKeyReused):
            await _run_once(sessions, leased_store, "k1", action, OTHER_FP)

        assert action.runs == 0

    async def test_a_failing_action_releases_the_key_for_a_retry(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        failing = Action(error=RuntimeError("gateway down"))

        with pytest.raises(RuntimeError, match="gateway down"):
            await _run_once(sessions, leased_store, "k1", failing)

        assert failing.runs == 1
        assert await _row(sessions, "k1") is None
        retry = Action(CREATED)
        assert await _run_once(sessions, leased_store, "k1", retry) == (CREATED, False)
        assert retry.runs == 1
        assert await _run_once(sessions, leased_store, "k1", retry) == (CREATED, True)

    async def test_the_response_becomes_visible_when_the_callers_session_commits(
        self,
        leased_store: IdempotencyStore,
        sessions: async_sessionmaker[AsyncSession],
        committed: Callable[[str], Awaitable[tuple[str, str, int | None] | None]],
    ) -> None:
        action = Action(CREATED)
        async with UnitOfWork(sessions) as session:
            response = await run_once(leased_store, session, SCOPE, "k1", FP, action)
            before_commit = await committed("k1")

        assert response == (CREATED, False)
        assert before_commit is not None
        assert (before_commit[0], before_commit[2]) == (IN_FLIGHT, None)  # the claim is committed at once
        assert await committed("k1") == (COMPLETED, before_commit[1], 201)
        assert await leased_store.claim(SCOPE, "k1", FP) == CREATED

    async def test_a_caller_that_rolls_back_leaves_the_key_in_flight_until_its_lease_runs_out(
        self, leased_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        action = Action(ACCEPTED)
        returned: list[tuple[StoredResponse, bool]] = []

        async def use_case_whose_commit_fails() -> None:
            async with UnitOfWork(sessions) as session:
                returned.append(await run_once(leased_store, session, SCOPE, "k1", FP, action))
                raise RuntimeError("commit failed")

        with pytest.raises(RuntimeError, match="commit failed"):
            await use_case_whose_commit_fails()

        assert returned == [(ACCEPTED, False)]

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.response_status) == (IN_FLIGHT, None)
        with pytest.raises(IdempotencyRequestInProgress):
            await _run_once(sessions, leased_store, "k1", action)
        assert action.runs == 1

        clock.advance(LEASE + 1)

        assert await _run_once(sessions, leased_store, "k1", action) == (ACCEPTED, False)
        assert action.runs == 2

    async def test_a_lost_claim_fails_and_leaves_the_new_owner_alone(
        self, impatient_store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        taken_over: list[Claim] = []

        async def lease_runs_out_and_another_request_takes_the_key() -> None:
            clock.advance(LEASE + 1)
            taken_over.append(await _claim(impatient_store, "k1"))

        slow = Action(ACCEPTED)
        slow.during = lease_runs_out_and_another_request_takes_the_key

        with pytest.raises(IdempotencyClaimLost):
            await _run_once(sessions, impatient_store, "k1", slow)

        [second] = taken_over
        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.owner, row.response_status) == (IN_FLIGHT, second.owner, None)
        await _complete(sessions, impatient_store, second, CREATED)
        assert await _run_once(sessions, impatient_store, "k1", slow) == (CREATED, True)
        assert slow.runs == 1

    async def test_a_failing_action_that_used_the_callers_session_releases_the_key(
        self,
        impatient_store: IdempotencyStore,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        async with UnitOfWork(sessions) as session:
            async def use_case_reads_then_fails() -> None:
                await session.execute(select(func.count()).select_from(IdempotencyKey))
                raise RuntimeError("gateway down")

            failing = Action()
            failing.during = use_case_reads_then_fails
            with pytest.raises(RuntimeError, match="gateway down"):
                await run_once(impatient_store, session, SCOPE, "k1", FP, failing)

        assert await _row(sessions, "k1") is None


@pytest.fixture(scope="module")
async def postgres_database(pg_database_factory: Callable[[], Awaitable[str]]) -> str:
    return await migrated(await pg_database_factory())


class TestConcurrentClaimsOnPostgres:
    async def test_fifty_concurrent_claims_have_one_owner_and_one_answer(
        self, postgres_database: str
    ) -> None:
        engine = create_engine(postgres_database, pool_size=20, max_overflow=40)
        sessions = session_factory(engine)
        store = IdempotencyStore(sessions, wait_seconds=30.0, poll_interval=0.02)
        owners = 0

        async def client() -> StoredResponse | Claim:
            nonlocal owners
            result = await store.claim(SCOPE, "race", FP)
            if isinstance(result, Claim):
                owners += 1
                await asyncio.sleep(0.2)  # the use case runs while the others wait
                await _complete(sessions, store, result)
            return result

        try:
            async with UnitOfWork(sessions) as session:
                await session.execute(delete(IdempotencyKey))
            results: list[Any] = await asyncio.wait_for(asyncio.gather(*(client() for _ in range(50))), 60)
            async with sessions() as session:
                rows = await session.scalar(select(func.count()).select_from(IdempotencyKey))
        finally:
            await engine.dispose()

        claims = [r for r in results if isinstance(r, Claim)]
        assert owners == 1
        assert len(claims) == 1
        assert [r for r in results if not isinstance(r, Claim)] == [ACCEPTED] * 49
        assert rows == 1

    async def test_fifty_concurrent_run_once_calls_run_the_action_once(self, postgres_database: str) -> None:
        engine = create_engine(postgres_database, pool_size=20, max_overflow=40)
        sessions = session_factory(engine)
        store = IdempotencyStore(sessions, wait_seconds=30.0, poll_interval=0.02)

        async def use_case() -> None:
            await asyncio.sleep(0.2)  # the others wait meanwhile

        action = Action(CREATED)
        action.during = use_case
        try:
            async with UnitOfWork(sessions) as session:
                await session.execute(delete(IdempotencyKey))
            results = await asyncio.wait_for(
                asyncio.gather(*(_run_once(sessions, store, "race", action) for _ in range(50))), 60)
        finally:
            await engine.dispose()

        assert action.runs == 1
        assert sorted(results, key=lambda result: result[1]) == [(CREATED, False)] + [(CREATED, True)] * 49
