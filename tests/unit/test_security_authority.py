"""The users module's ``AuthorityStore`` (modules/users/authority.py): L1 in-process, L2 shared cache,
L3 the database, and what ``forget`` promises. The database is a fake that counts its reads; the
shared cache is a real ``MemoryCache`` (two stores on one cache are two API processes on one Redis)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry

from core.cache.stores import CacheUnavailable, MemoryCache
from core.security import SessionAuthority
from modules.users.authority import SessionAuthorities


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Database:
    """The session rows behind the store (``SessionRepository.authority``), counting reads."""

    def __init__(self, clock: Clock) -> None:
        self.rows: dict[uuid.UUID, dict[str, Any]] = {}
        self.reads = 0
        self.read_takes = 0.0  # seconds of the fake clock one read takes
        self.gate: asyncio.Event | None = None  # when set, reads wait for it

    def add(self, *, admin: bool = False) -> uuid.UUID:
        session_id = uuid.uuid4()
        self.rows[session_id] = {"user_id": uuid.uuid4(), "is_admin": admin, "is_active": True,
                                 "revoked_at": None}
        return session_id

    async def authority(self, engine: Any, session_id: uuid.UUID) -> dict[str, Any] | None:
        self.reads += 1
        row = self.rows.get(session_id)
        found = None if row is None else dict(row)  # the row as it is when the read begins
        if self.gate is not None:
            await self.gate.wait()
        self.clock.advance(self.read_takes)
        return found

    clock: Clock


class CountingCache(MemoryCache):
    """A MemoryCache that counts guarded reads (L2 lookups) and can be taken down."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.invalidations = 0
        self.down = False

    async def get_current(self, key: str) -> tuple[int, bytes | None]:
        self.lookups += 1
        if self.down:
            raise CacheUnavailable("down")
        return await super().get_current(key)

    async def invalidate(self, *keys: str) -> None:
        self.invalidations += 1
        if self.down:
            raise CacheUnavailable("down")
        await super().invalidate(*keys)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(clock: Clock) -> Database:
    database = Database(clock)
    database.clock = clock
    return database


@pytest.fixture
def cache() -> CountingCache:
    return CountingCache()


def store(
    db: Database, cache: CountingCache, clock: Clock, local: float = 1.0, **options: Any
) -> SessionAuthorities:
    return SessionAuthorities(
        None, cache, db, CollectorRegistry(), local_seconds=local, clock=clock, **options  # type: ignore[arg-type]
    )


def revoke(db: Database, session_id: uuid.UUID) -> None:
    db.rows[session_id]["revoked_at"] = datetime.now(UTC)


class TestRead:
    async def test_a_session_reads_as_its_account_stands(self, db: Database, cache: CountingCache,
                                                         clock: Clock) -> None:
        sid = db.add(admin=True)
        found = await store(db, cache, clock).authority(sid)
        assert isinstance(found, SessionAuthority)
        assert found.principal.user_id == db.rows[sid]["user_id"]
        assert found.principal.session_id == sid
        assert (found.principal.is_admin, found.active, found.revoked) == (True, True, False)

    async def test_revoked_and_disabled_are_told_apart(self, db: Database, cache: CountingCache,
                                                       clock: Clock) -> None:
        revoked, disabled = db.add(), db.add()
        revoke(db, revoked)
        db.rows[disabled]["is_active"] = False
        authorities = store(db, cache, clock)
        first, second = await authorities.authority(revoked), await authorities.authority(disabled)
        assert first is not None
        assert (first.active, first.revoked) == (True, True)
        assert second is not None
        assert (second.active, second.revoked) == (False, False)

    async def test_an_unknown_session_is_none_and_remembered_in_the_shared_cache(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        ghost = uuid.uuid4()
        assert await store(db, cache, clock).authority(ghost) is None
        assert await store(db, cache, clock).authority(ghost) is None  # another process
        assert db.reads == 1


class TestLayers:
    async def test_within_the_window_a_hit_asks_neither_cache_nor_database(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        sid = db.add()
        authorities = store(db, cache, clock)
        first = await authorities.authority(sid)
        lookups, reads = cache.lookups, db.reads
        clock.advance(0.99)
        assert await authorities.authority(sid) is first
        assert (cache.lookups, db.reads) == (lookups, reads)

    async def test_after_the_window_the_shared_cache_answers_not_the_database(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        sid = db.add()
        authorities = store(db, cache, clock)
        await authorities.authority(sid)
        clock.advance(1.0)
        await authorities.authority(sid)
        assert (cache.lookups, db.reads) == (2, 1)

    async def test_the_window_counts_from_before_the_load(self, db: Database, cache: CountingCache,
                                                          clock: Clock) -> None:
        sid = db.add()
        db.read_takes = 0.4
        authorities = store(db, cache, clock)
        await authorities.authority(sid)  # began at t, finished at t + 0.4
        clock.advance(0.6)
        await authorities.authority(sid)
        assert cache.lookups == 2  # t + 1.0: the entry had expired

    async def test_no_local_window_asks_the_shared_cache_every_time(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        sid = db.add()
        authorities = store(db, cache, clock, local=0.0)
        for _ in range(3):
            await authorities.authority(sid)
        assert (cache.lookups, db.reads) == (3, 1)

    async def test_concurrent_misses_share_one_load(self, db: Database, cache: CountingCache,
                                                    clock: Clock) -> None:
        sid = db.add()
        db.gate = asyncio.Event()
        authorities = store(db, cache, clock)
        waiting = [asyncio.create_task(authorities.authority(sid)) for _ in range(5)]
        await asyncio.sleep(0.01)
        db.gate.set()
        results = await asyncio.gather(*waiting)
        assert db.reads == 1
        assert all(r is results[0] for r in results)

    async def test_the_local_map_stays_bounded(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        authorities = store(db, cache, clock, max_local=3)
        for _ in range(10):
            await authorities.authority(db.add())
        assert len(authorities._local) <= 3


class TestForget:
    async def test_a_change_is_seen_only_once_forgotten(self, db: Database, cache: CountingCache,
                                                        clock: Clock) -> None:
        sid = db.add(admin=True)
        authorities = store(db, cache, clock)
        await authorities.authority(sid)
        db.rows[sid]["is_admin"] = False
        clock.advance(5.0)  # past the local window: the shared cache still holds the old row
        before = await authorities.authority(sid)
        assert before is not None
        assert before.principal.is_admin is True

        await authorities.forget([sid])

        after = await authorities.authority(sid)
        assert after is not None
        assert after.principal.is_admin is False

    async def test_another_process_follows_within_its_local_window(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        sid = db.add()
        here, there = store(db, cache, clock), store(db, cache, clock)
        await there.authority(sid)
        clock.advance(0.5)
        revoke(db, sid)
        await here.forget([sid])

        stale = await there.authority(sid)
        assert stale is not None
        assert stale.revoked is False
        clock.advance(0.5)
        fresh = await there.authority(sid)
        assert fresh is not None
        assert fresh.revoked is True

    async def test_a_load_overtaken_by_forget_keeps_nothing(self, db: Database, cache: CountingCache,
                                                            clock: Clock) -> None:
        sid = db.add()
        db.gate = asyncio.Event()
        authorities = store(db, cache, clock)
        loading = asyncio.create_task(authorities.authority(sid))
        await asyncio.sleep(0.01)
        revoke(db, sid)
        await authorities.forget([sid])
        db.gate.set()
        stale = await loading  # read the row before the revocation
        assert stale is not None
        assert stale.revoked is False
        found = await authorities.authority(sid)
        assert found is not None
        assert found.revoked is True
        assert db.reads == 2

    async def test_forgetting_nothing_is_free(self, db: Database, cache: CountingCache, clock: Clock) -> None:
        await store(db, cache, clock).forget([])
        assert cache.invalidations == 0


class TestCacheDown:
    async def test_reads_go_to_the_database(self, db: Database, cache: CountingCache, clock: Clock) -> None:
        sid = db.add()
        cache.down = True
        found = await store(db, cache, clock, local=0.0).authority(sid)
        assert found is not None
        assert found.principal.user_id == db.rows[sid]["user_id"]
        assert db.reads == 1

    async def test_forget_still_clears_this_process_and_warns(
        self, db: Database, cache: CountingCache, clock: Clock
    ) -> None:
        sid = db.add()
        authorities = store(db, cache, clock)
        await authorities.authority(sid)
        cache.down = True
        revoke(db, sid)
        warnings: list[str] = []
        sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
        try:
            await authorities.forget([sid])
        finally:
            logger.remove(sink)
        found = await authorities.authority(sid)
        assert found is not None
        assert found.revoked is True
        assert any("could not invalidate 1 cached session" in w for w in warnings)
