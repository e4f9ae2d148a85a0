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
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db import UnitOfWork, create_engine, session_factory
from core.idempotency import (
    COMPLETED,
    IN_FLIGHT,
    IdempotencyClaimLost,
    IdempotencyKey,
    IdempotencyKeyReused,
    IdempotencyRequestInProgress,
    IdempotencyStore,
    StoredResponse,
    fingerprint,
)
from tests.conftest import migrated

SCOPE = "billing.payments"
FP = fingerprint("POST", "/api/v1/invoices/1/payments", b'{"payment_token": "tok_1"}')
OTHER_FP = fingerprint("POST", "/api/v1/invoices/1/payments", b'{"payment_token": "tok_2"}')
ACCEPTED = StoredResponse(status=202, body={"id": "p-1", "status": "pending", "amounts": [1, 2]})


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
    return IdempotencyStore(sessions, ttl_seconds=60, wait_seconds=2.0, poll_interval=0.01, clock=clock)


async def _complete(sessions: async_sessionmaker[AsyncSession], store: IdempotencyStore, key: str,
                    response: StoredResponse = ACCEPTED, scope: str = SCOPE) -> None:
    async with UnitOfWork(sessions) as session:
        await store.complete(session, scope, key, response)


async def _row(sessions: async_sessionmaker[AsyncSession], key: str,
               scope: str = SCOPE) -> IdempotencyKey | None:
    async with sessions() as session:
        return await session.get(IdempotencyKey, (scope, key))


class TestClaim:
    async def test_the_first_claim_owns_the_key(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.fingerprint, row.response_status) == (IN_FLIGHT, FP, None)
        assert row.created_at == clock.now
        assert row.expires_at == clock.now + timedelta(seconds=60)

    async def test_a_completed_key_replays_its_response(self, store: IdempotencyStore,
                                                        sessions: async_sessionmaker[AsyncSession]) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        await _complete(sessions, store, "k1")

        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED

    async def test_another_fingerprint_is_refused_while_in_flight_and_after_completion(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        with pytest.raises(IdempotencyKeyReused) as in_flight:
            await store.claim(SCOPE, "k1", OTHER_FP)
        await _complete(sessions, store, "k1")
        with pytest.raises(IdempotencyKeyReused) as completed:
            await store.claim(SCOPE, "k1", OTHER_FP)

        assert in_flight.value.status == completed.value.status == 422
        assert completed.value.code == "idempotency_key_reused"
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED

    async def test_an_in_flight_key_times_out_as_in_progress(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        store = IdempotencyStore(sessions, wait_seconds=0.1, poll_interval=0.01, clock=clock)
        assert await store.claim(SCOPE, "k1", FP) is None

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
        assert await store.claim(SCOPE, "k1", FP) is None
        waiter = asyncio.create_task(store.claim(SCOPE, "k1", FP))
        await asyncio.sleep(0.1)
        assert not waiter.done()

        await _complete(sessions, store, "k1")

        assert await asyncio.wait_for(waiter, 5) == ACCEPTED

    async def test_a_waiter_claims_the_key_when_the_owner_releases_it(self, store: IdempotencyStore) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        waiter = asyncio.create_task(store.claim(SCOPE, "k1", FP))
        await asyncio.sleep(0.05)

        await store.release(SCOPE, "k1")

        assert await asyncio.wait_for(waiter, 5) is None

    async def test_an_expired_key_is_claimed_again(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        assert await store.claim(SCOPE, "done", FP) is None
        await _complete(sessions, store, "done")
        assert await store.claim(SCOPE, "stuck", FP) is None

        clock.advance(61)

        assert await store.claim(SCOPE, "done", OTHER_FP) is None  # another body is fine once expired
        assert await store.claim(SCOPE, "stuck", FP) is None
        row = await _row(sessions, "done")
        assert row is not None
        assert (row.state, row.fingerprint, row.response_status, row.response_body) == (
            IN_FLIGHT, OTHER_FP, None, None)
        assert row.expires_at == clock.now + timedelta(seconds=60)

    async def test_a_key_not_yet_expired_is_not_taken_over(
        self, store: IdempotencyStore, clock: Clock
    ) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        clock.advance(59)

        with pytest.raises(IdempotencyKeyReused):
            await store.claim(SCOPE, "k1", OTHER_FP)

    async def test_scopes_are_independent(self, store: IdempotencyStore,
                                          sessions: async_sessionmaker[AsyncSession]) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        await _complete(sessions, store, "k1")

        assert await store.claim("other.scope", "k1", OTHER_FP) is None
        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED


class TestComplete:
    async def test_the_response_is_stored_in_the_callers_transaction(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        async with UnitOfWork(sessions) as session:
            await store.complete(session, SCOPE, "k1", StoredResponse(status=201, body=None))

        row = await _row(sessions, "k1")
        assert row is not None
        assert (row.state, row.response_status, row.response_body) == (COMPLETED, 201, None)
        assert await store.claim(SCOPE, "k1", FP) == StoredResponse(status=201, body=None)

    async def test_a_rolled_back_completion_leaves_the_key_in_flight(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None

        async def use_case_that_fails_after_completing() -> None:
            async with UnitOfWork(sessions) as session:
                await store.complete(session, SCOPE, "k1", ACCEPTED)
                raise RuntimeError("use case failed")

        with pytest.raises(RuntimeError, match="use case failed"):
            await use_case_that_fails_after_completing()

        row = await _row(sessions, "k1")
        assert row is not None
        assert row.state == IN_FLIGHT
        await store.release(SCOPE, "k1")
        assert await store.claim(SCOPE, "k1", FP) is None

    async def test_completing_an_unclaimed_key_fails(self, store: IdempotencyStore,
                                                     sessions: async_sessionmaker[AsyncSession]) -> None:
        with pytest.raises(IdempotencyClaimLost):
            await _complete(sessions, store, "never-claimed")

        assert await _row(sessions, "never-claimed") is None


class TestRelease:
    async def test_a_released_key_can_be_claimed_again(self, store: IdempotencyStore,
                                                       sessions: async_sessionmaker[AsyncSession]) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None

        await store.release(SCOPE, "k1")

        assert await _row(sessions, "k1") is None
        assert await store.claim(SCOPE, "k1", OTHER_FP) is None

    async def test_release_keeps_a_completed_response(self, store: IdempotencyStore,
                                                      sessions: async_sessionmaker[AsyncSession]) -> None:
        assert await store.claim(SCOPE, "k1", FP) is None
        await _complete(sessions, store, "k1")

        await store.release(SCOPE, "k1")

        assert await store.claim(SCOPE, "k1", FP) == ACCEPTED


class TestPurgeExpired:
    async def test_only_expired_rows_are_deleted_and_counted(
        self, store: IdempotencyStore, sessions: async_sessionmaker[AsyncSession], clock: Clock
    ) -> None:
        assert await store.claim(SCOPE, "old-1", FP) is None
        assert await store.claim(SCOPE, "old-2", FP) is None
        await _complete(sessions, store, "old-2")
        clock.advance(30)
        assert await store.claim(SCOPE, "new", FP) is None
        clock.advance(31)

        assert await store.purge_expired() == 2
        assert await store.purge_expired() == 0
        async with sessions() as session:
            keys = (await session.scalars(select(IdempotencyKey.key))).all()
        assert keys == ["new"]


class TestFingerprint:
    def test_json_key_order_and_whitespace_do_not_matter(self) -> None:
        a = fingerprint("POST", "/p", b'{"a": 1, "b": {"y": [1, 2], "x": null}}')
        b = fingerprint("post", "/p", b'{ "b" : {"x":null,"y":[1,2]} ,\n "a":1 }')

        assert a == b
        assert len(a) == 64
        assert int(a, 16) >= 0

    def test_values_method_and_path_matter(self) -> None:
        base = fingerprint("POST", "/p", b'{"a": 1}')

        assert fingerprint("POST", "/p", b'{"a": 2}') != base
        assert fingerprint("PUT", "/p", b'{"a": 1}') != base
        assert fingerprint("POST", "/q", b'{"a": 1}') != base
        assert fingerprint("POST", "/p", b'[{"a": 1}]') != base

    def test_a_non_json_body_is_compared_byte_for_byte(self) -> None:
        assert fingerprint("POST", "/p", b"a=1&b=2") == fingerprint("POST", "/p", b"a=1&b=2")
        assert fingerprint("POST", "/p", b"a=1&b=2") != fingerprint("POST", "/p", b"b=2&a=1")
        assert fingerprint("POST", "/p", b"\xff\xfe") != fingerprint("POST", "/p", b"")
        # a JSON body and a raw body with the same canonical bytes stay distinct
        assert fingerprint("POST", "/p", b'{"a":1}') != fingerprint("POST", "/p", b'{"a":1')


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

        async def client() -> StoredResponse | None:
            nonlocal owners
            result = await store.claim(SCOPE, "race", FP)
            if result is None:
                owners += 1
                await asyncio.sleep(0.2)  # the use case runs while the others wait
                await _complete(sessions, store, "race")
            return result

        try:
            results: list[Any] = await asyncio.wait_for(asyncio.gather(*(client() for _ in range(50))), 60)
            async with sessions() as session:
                rows = await session.scalar(select(func.count()).select_from(IdempotencyKey))
        finally:
            await engine.dispose()

        assert owners == 1
        assert results.count(None) == 1
        assert [r for r in results if r is not None] == [ACCEPTED] * 49
        assert rows == 1
