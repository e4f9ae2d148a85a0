"""One behavioural contract for every ``Cache`` adapter: code written against the port must not be
able to tell ``MemoryCache`` from ``RedisCache`` (apart from speed and failure modes)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import uuid4

import pytest
from pydantic import BaseModel

from core.cache import Cache, CacheUnavailable, MemoryCache, RedisCache, TypedCache
from tests.support.services import REDIS_URL, require

Elapse = Callable[[float], Awaitable[None]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _purge(cache: RedisCache) -> None:
    keys = [key async for key in cache.client.scan_iter(match=f"{cache.namespace}:*", count=500)]
    if keys:
        await cache.client.delete(*keys)


@asynccontextmanager
async def _fresh_redis_cache() -> AsyncIterator[RedisCache]:
    require("redis")
    cache = RedisCache.from_url(REDIS_URL, namespace=f"atrium-test:{uuid4().hex}")
    try:
        yield cache
    finally:
        await _purge(cache)
        await cache.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def redis_cache() -> AsyncIterator[RedisCache]:
    async with _fresh_redis_cache() as cache:
        yield cache


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Cache]:
    if request.param == "memory":
        memory = MemoryCache(clock=clock)
        yield memory
        await memory.aclose()
    else:
        async with _fresh_redis_cache() as redis_cache:
            yield redis_cache


@pytest.fixture
def elapse(cache: Cache, clock: FakeClock) -> Elapse:
    """Let ``seconds`` pass for ``cache``: the fake clock for memory, real time for Redis.

    Redis tests use TTLs of 0.2 s and elapse 0.4 s, leaving slack for the server's expiry."""

    async def _elapse(seconds: float) -> None:
        if isinstance(cache, MemoryCache):
            clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    return _elapse


class Profile(BaseModel):
    id: int
    name: str
    tags: list[str] = []


class TestGet:
    async def test_a_missing_key_is_a_miss(self, cache: Cache) -> None:
        assert await cache.get("never-set") is None

    @pytest.mark.parametrize(
        "value",
        [b"plain", bytes(range(256)), b"", "h\u00e9llo \u2713".encode(), b"\x00" * 100_000],
        ids=["ascii", "all-bytes", "empty", "utf8", "large"],
    )
    async def test_returns_exactly_the_bytes_that_were_set(self, cache: Cache, value: bytes) -> None:
        await cache.set("k", value)
        assert await cache.get("k") == value

    async def test_keys_are_distinct_and_case_sensitive(self, cache: Cache) -> None:
        await cache.set("Key", b"upper")
        await cache.set("key", b"lower")
        await cache.set("k\u00e9y:with:colons", b"other")
        assert await cache.get("Key") == b"upper"
        assert await cache.get("key") == b"lower"
        assert await cache.get("k\u00e9y:with:colons") == b"other"


class TestSet:
    async def test_overwrite_replaces_the_value(self, cache: Cache) -> None:
        await cache.set("k", b"first")
        await cache.set("k", b"second")
        assert await cache.get("k") == b"second"

    async def test_value_expires_after_its_ttl(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set("k", b"v", ttl=0.2)
        assert await cache.get("k") == b"v"
        await elapse(0.4)
        assert await cache.get("k") is None

    async def test_without_ttl_the_value_does_not_expire(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set("k", b"v")
        await elapse(0.4)
        assert await cache.get("k") == b"v"

    async def test_overwriting_without_ttl_clears_the_old_ttl(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set("k", b"short-lived", ttl=0.2)
        await cache.set("k", b"forever")
        await elapse(0.4)
        assert await cache.get("k") == b"forever"

    @pytest.mark.parametrize("ttl", [0, -1.0])
    async def test_a_non_positive_ttl_is_rejected(self, cache: Cache, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl"):
            await cache.set("k", b"v", ttl=ttl)
        assert await cache.get("k") is None


class TestAdd:
    async def test_sets_an_absent_key(self, cache: Cache) -> None:
        assert await cache.add("k", b"v") is True
        assert await cache.get("k") == b"v"

    async def test_leaves_a_present_key_alone(self, cache: Cache) -> None:
        await cache.set("k", b"original")
        assert await cache.add("k", b"intruder") is False
        assert await cache.get("k") == b"original"

    async def test_an_expired_key_counts_as_absent(self, cache: Cache, elapse: Elapse) -> None:
        assert await cache.add("k", b"old", ttl=0.2) is True
        await elapse(0.4)
        assert await cache.add("k", b"new") is True
        assert await cache.get("k") == b"new"

    async def test_only_one_of_concurrent_adds_wins(self, cache: Cache) -> None:
        results = await asyncio.gather(*(cache.add("lock", str(i).encode()) for i in range(10)))
        assert sorted(results) == [False] * 9 + [True]
        winner = results.index(True)
        assert await cache.get("lock") == str(winner).encode()


class TestDelete:
    async def test_returns_how_many_keys_were_removed(self, cache: Cache) -> None:
        await cache.set("a", b"1")
        await cache.set("b", b"2")
        assert await cache.delete("a", "b", "missing") == 2
        assert await cache.get_many(["a", "b"]) == [None, None]

    async def test_deleting_nothing_or_a_missing_key_removes_nothing(self, cache: Cache) -> None:
        await cache.set("a", b"1")
        assert await cache.delete() == 0
        assert await cache.delete("missing") == 0
        assert await cache.get("a") == b"1"

    async def test_an_expired_key_is_not_counted(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set("a", b"1", ttl=0.2)
        await elapse(0.4)
        assert await cache.delete("a") == 0


class TestGetMany:
    async def test_values_come_back_in_key_order_with_none_for_misses(self, cache: Cache) -> None:
        await cache.set("a", b"1")
        await cache.set("c", b"3")
        assert await cache.get_many(["c", "missing", "a", "c"]) == [b"3", None, b"1", b"3"]

    async def test_no_keys_gives_an_empty_list(self, cache: Cache) -> None:
        assert await cache.get_many([]) == []

    async def test_expired_values_are_misses(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set("short", b"s", ttl=0.2)
        await cache.set("long", b"l")
        await elapse(0.4)
        assert await cache.get_many(["short", "long"]) == [None, b"l"]


class TestPing:
    async def test_a_healthy_cache_answers(self, cache: Cache) -> None:
        assert await cache.ping() is None


class TestTypedCache:
    async def test_roundtrips_a_model(self, cache: Cache) -> None:
        profiles = TypedCache[Profile](cache, Profile, prefix="profile", ttl=None)
        await profiles.set("1", Profile(id=1, name="Ada", tags=["admin"]))
        assert await profiles.get("1") == Profile(id=1, name="Ada", tags=["admin"])
        assert await profiles.get("2") is None

    async def test_stores_json_under_its_prefix(self, cache: Cache) -> None:
        profiles = TypedCache[Profile](cache, Profile, prefix="profile", ttl=None)
        await profiles.set("1", Profile(id=1, name="Ada"))
        assert await cache.get("profile:1") == b'{"id":1,"name":"Ada","tags":[]}'

    async def test_roundtrips_non_model_types(self, cache: Cache) -> None:
        counts = TypedCache[dict[str, int]](cache, dict[str, int], prefix="counts", ttl=None)
        await counts.set("x", {"a": 1, "b": 2})
        assert await counts.get("x") == {"a": 1, "b": 2}

    @pytest.mark.parametrize(
        "stored",
        [b'{"id":"not-a-number","name":"Ada"}', b'{"name":"Ada"}', b"not json at all", b""],
        ids=["wrong-type", "missing-field", "garbage", "empty"],
    )
    async def test_data_that_no_longer_validates_is_a_miss(self, cache: Cache, stored: bytes) -> None:
        profiles = TypedCache[Profile](cache, Profile, prefix="profile", ttl=None)
        await cache.set("profile:1", stored)
        assert await profiles.get("1") is None

    async def test_delete_removes_the_value(self, cache: Cache) -> None:
        profiles = TypedCache[Profile](cache, Profile, prefix="profile", ttl=None)
        await profiles.set("1", Profile(id=1, name="Ada"))
        await profiles.delete("1")
        assert await profiles.get("1") is None
        assert await cache.get("profile:1") is None

    async def test_values_expire_after_the_ttl(self, cache: Cache, elapse: Elapse) -> None:
        profiles = TypedCache[Profile](cache, Profile, prefix="profile", ttl=0.2)
        await profiles.set("1", Profile(id=1, name="Ada"))
        assert await profiles.get("1") is not None
        await elapse(0.4)
        assert await profiles.get("1") is None


class TestMemoryCache:
    async def test_evicts_the_least_recently_used_entry_at_capacity(self) -> None:
        cache = MemoryCache(max_entries=2)
        await cache.set("a", b"1")
        await cache.set("b", b"2")
        assert await cache.get("a") == b"1"  # "b" is now the least recently used
        await cache.set("c", b"3")
        assert len(cache) == 2
        assert await cache.get_many(["a", "b", "c"]) == [b"1", None, b"3"]

    async def test_a_value_is_live_until_exactly_its_ttl(self, clock: FakeClock) -> None:
        cache = MemoryCache(clock=clock)
        await cache.set("k", b"v", ttl=10)
        clock.advance(9.999)
        assert await cache.get("k") == b"v"
        clock.advance(0.001)
        assert await cache.get("k") is None
        assert len(cache) == 0  # expired entries are dropped when read

    async def test_a_stored_bytearray_is_not_aliased(self) -> None:
        cache = MemoryCache()
        buffer = bytearray(b"abc")
        await cache.set("k", buffer)  # type: ignore[arg-type]
        buffer[0] = ord("z")
        assert await cache.get("k") == b"abc"

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_entries"):
            MemoryCache(max_entries=0)


class TestRedisCache:
    async def test_keys_are_stored_under_the_namespace(self, redis_cache: RedisCache) -> None:
        await redis_cache.set("k", b"v")
        assert await redis_cache.client.get(f"{redis_cache.namespace}:k") == b"v"
        assert await redis_cache.client.get("k") is None

    async def test_ttl_is_sent_to_redis_in_milliseconds(self, redis_cache: RedisCache) -> None:
        await redis_cache.set("k", b"v", ttl=30.5)
        pttl = await redis_cache.client.pttl(f"{redis_cache.namespace}:k")
        assert 30_000 < pttl <= 30_500

    async def test_namespaces_do_not_see_each_others_keys(self, redis_cache: RedisCache) -> None:
        other = RedisCache(redis_cache.client, namespace=f"atrium-test:{uuid4().hex}")
        try:
            await redis_cache.set("shared", b"mine")
            assert await other.get("shared") is None
            assert await other.add("shared", b"theirs") is True
            assert await other.delete("shared") == 1
            assert await redis_cache.get("shared") == b"mine"
        finally:
            await _purge(other)

    @pytest.mark.parametrize(
        "operation",
        [
            lambda c: c.get("k"),
            lambda c: c.get_many(["a", "b"]),
            lambda c: c.set("k", b"v", ttl=1),
            lambda c: c.add("k", b"v"),
            lambda c: c.delete("k"),
            lambda c: c.ping(),
        ],
        ids=["get", "get_many", "set", "add", "delete", "ping"],
    )
    async def test_an_unreachable_server_raises_cache_unavailable_quickly(
        self, operation: Callable[[RedisCache], Awaitable[object]]
    ) -> None:
        cache = RedisCache.from_url("redis://127.0.0.1:1/0", namespace="unreachable")
        started = time.monotonic()
        try:
            with pytest.raises(CacheUnavailable) as caught:
                await operation(cache)
        finally:
            await cache.aclose()
        assert time.monotonic() - started < 2.0
        assert caught.value.__cause__ is not None  # the driver's error stays inspectable

    async def test_a_hung_server_times_out_instead_of_blocking(self) -> None:
        # Accepts TCP connections (via the kernel backlog) but never answers a command.
        with socket.create_server(("127.0.0.1", 0)) as hung:
            port = hung.getsockname()[1]
            cache = RedisCache.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
            started = time.monotonic()
            try:
                with pytest.raises(CacheUnavailable):
                    await cache.get("k")
            finally:
                await cache.aclose()
        # A cache must fail fast so callers can fall back to the source of truth.
        assert time.monotonic() - started < 1.5
