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

from core.cache.stores import GEN_TTL, Cache, CacheUnavailable, MemoryCache, NullCache, RedisCache, TypedCache
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


class TestGetCurrent:
    async def test_a_new_key_is_generation_zero_and_a_miss(self, cache: Cache) -> None:
        assert await cache.get_current("never-seen") == (0, None)

    async def test_returns_the_value_stored_for_the_current_generation(self, cache: Cache) -> None:
        assert await cache.set_current("k", 0, b"v") is True
        assert await cache.get_current("k") == (0, b"v")

    async def test_is_independent_of_plain_keys(self, cache: Cache) -> None:
        await cache.set("k", b"plain")
        assert await cache.get_current("k") == (0, None)
        await cache.set_current("k", 0, b"guarded")
        assert await cache.get("k") == b"plain"


class TestSetCurrent:
    async def test_overwrites_the_value_of_the_current_generation(self, cache: Cache) -> None:
        await cache.set_current("k", 0, b"first")
        assert await cache.set_current("k", 0, b"second") is True
        assert await cache.get_current("k") == (0, b"second")

    async def test_a_reader_cannot_store_a_value_loaded_before_a_write(self, cache: Cache) -> None:
        await cache.set_current("k", 0, b"old")
        await cache.invalidate("k")
        generation, value = await cache.get_current("k")  # reader misses, loads from the DB...
        assert (generation, value) == (1, None)
        await cache.invalidate("k")  # ...while a writer commits and invalidates...
        assert await cache.set_current("k", generation, b"stale") is False  # ...so this is refused
        assert await cache.get_current("k") == (2, None)
        assert await cache.set_current("k", 2, b"fresh") is True
        assert await cache.get_current("k") == (2, b"fresh")

    async def test_a_future_generation_is_refused(self, cache: Cache) -> None:
        assert await cache.set_current("k", 1, b"v") is False
        assert await cache.get_current("k") == (0, None)

    async def test_value_expires_after_its_ttl(self, cache: Cache, elapse: Elapse) -> None:
        await cache.invalidate("k")
        assert await cache.set_current("k", 1, b"v", ttl=0.2) is True
        assert await cache.get_current("k") == (1, b"v")
        await elapse(0.4)
        assert await cache.get_current("k") == (1, None)

    async def test_without_ttl_the_value_outlives_short_ttls(self, cache: Cache, elapse: Elapse) -> None:
        await cache.set_current("k", 0, b"v")
        await elapse(0.4)
        assert await cache.get_current("k") == (0, b"v")

    @pytest.mark.parametrize("ttl", [0, -1.0])
    async def test_a_non_positive_ttl_is_rejected(self, cache: Cache, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl"):
            await cache.set_current("k", 0, b"v", ttl=ttl)
        assert await cache.get_current("k") == (0, None)

    async def test_a_negative_generation_is_rejected(self, cache: Cache) -> None:
        with pytest.raises(ValueError, match="generation"):
            await cache.set_current("k", -1, b"v")


class TestInvalidate:
    async def test_bumps_the_generation_and_drops_the_old_value(self, cache: Cache) -> None:
        await cache.set_current("k", 0, b"v")
        await cache.invalidate("k")
        assert await cache.get_current("k") == (1, None)
        await cache.invalidate("k")
        assert await cache.get_current("k") == (2, None)

    async def test_a_never_seen_key_can_be_invalidated(self, cache: Cache) -> None:
        await cache.invalidate("never-seen")
        assert await cache.get_current("never-seen") == (1, None)

    async def test_invalidates_several_keys_and_leaves_the_rest_alone(self, cache: Cache) -> None:
        for key in ("a", "b", "c"):
            await cache.set_current(key, 0, key.encode())
        await cache.invalidate("a", "b", "a")
        assert await cache.get_current("a") == (1, None)  # a key named twice is bumped once
        assert await cache.get_current("b") == (1, None)
        assert await cache.get_current("c") == (0, b"c")

    async def test_invalidating_nothing_is_a_no_op(self, cache: Cache) -> None:
        await cache.set_current("k", 0, b"v")
        await cache.invalidate()
        assert await cache.get_current("k") == (0, b"v")


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

    async def test_evicting_a_generation_counter_drops_its_value(self) -> None:
        cache = MemoryCache(max_entries=2)
        await cache.invalidate("a")
        await cache.set_current("a", 1, b"a1")
        await cache.invalidate("a")
        await cache.invalidate("a")  # "a" is at generation 3 with no value...
        await cache.set_current("a", 3, b"a3")
        await cache.invalidate("b", "c")  # ...and its counter is evicted with its value
        assert await cache.get_current("a") == (0, None)
        assert await cache.get("a@3") is None
        for _ in range(3):  # climbing back to generation 3 cannot reveal the old value
            await cache.invalidate("a")
        assert await cache.get_current("a") == (3, None)

    async def test_generation_counters_are_not_entries(self) -> None:
        cache = MemoryCache(max_entries=2)
        await cache.invalidate("a", "b")
        assert len(cache) == 0
        await cache.set("x", b"1")
        await cache.set("y", b"2")
        assert await cache.get_current("a") == (1, None)
        assert await cache.get_many(["x", "y"]) == [b"1", b"2"]

    async def test_reading_a_generation_keeps_its_counter_alive(self) -> None:
        cache = MemoryCache(max_entries=2)
        await cache.invalidate("a", "b")
        await cache.get_current("a")  # "b" is now the least recently used counter
        await cache.invalidate("c")
        assert await cache.get_current("a") == (1, None)
        assert await cache.get_current("b") == (0, None)

    async def test_a_guarded_value_lives_at_most_gen_ttl(self, clock: FakeClock) -> None:
        cache = MemoryCache(clock=clock)
        await cache.set_current("k", 0, b"v", ttl=GEN_TTL * 2)
        clock.advance(GEN_TTL - 1)
        assert await cache.get_current("k") == (0, b"v")
        clock.advance(1)
        assert await cache.get_current("k") == (0, None)

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_entries"):
            MemoryCache(max_entries=0)


class TestNullCache:
    async def test_every_read_misses_and_every_write_is_dropped(self) -> None:
        cache = NullCache()
        await cache.set("k", b"v", ttl=1)
        assert await cache.get("k") is None
        assert await cache.get_many(["k", "other"]) == [None, None]
        assert await cache.add("k", b"v") is False
        assert await cache.delete("k") == 0
        assert await cache.get_current("k") == (0, None)
        assert await cache.set_current("k", 0, b"v") is False
        await cache.invalidate("k")
        assert await cache.get_current("k") == (0, None)
        assert await cache.ping() is None
        await cache.aclose()

    async def test_invalid_arguments_are_still_rejected(self) -> None:
        cache = NullCache()
        with pytest.raises(ValueError, match="ttl"):
            await cache.set("k", b"v", ttl=0)
        with pytest.raises(ValueError, match="ttl"):
            await cache.set_current("k", 0, b"v", ttl=-1)

    async def test_typed_cache_over_it_always_misses(self) -> None:
        profiles = TypedCache[Profile](NullCache(), Profile, prefix="profile", ttl=None)
        await profiles.set("1", Profile(id=1, name="Ada"))
        assert await profiles.get("1") is None


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

    async def test_generations_and_values_are_stored_under_the_namespace(
        self, redis_cache: RedisCache
    ) -> None:
        ns = redis_cache.namespace
        await redis_cache.invalidate("k")
        await redis_cache.set_current("k", 1, b"v", ttl=30.5)
        assert await redis_cache.client.get(f"{ns}:k#gen") == b"1"
        assert await redis_cache.client.get(f"{ns}:k@") == b"1:v"  # stamped with its generation
        assert 30_000 < await redis_cache.client.pttl(f"{ns}:k@") <= 30_500
        await redis_cache.invalidate("k")
        assert await redis_cache.client.exists(f"{ns}:k@") == 0  # the old generation's value is gone

    async def test_a_value_stamped_with_another_generation_is_a_miss(self, redis_cache: RedisCache) -> None:
        ns = redis_cache.namespace
        await redis_cache.invalidate("k")
        await redis_cache.invalidate("k")  # generation 2
        for stale in (b"1:old", b"12:other", b"unstamped", b"2"):  # "2" lacks the separator
            await redis_cache.client.set(f"{ns}:k@", stale)
            assert await redis_cache.get_current("k") == (2, None), stale
        await redis_cache.client.set(f"{ns}:k@", b"2:1:colons:kept")
        assert await redis_cache.get_current("k") == (2, b"1:colons:kept")

    async def test_a_value_of_the_per_generation_layout_is_never_read(self, redis_cache: RedisCache) -> None:
        # Before the stamped layout a value lived at K@<generation>; a process of either version
        # must not serve what the other stored under its own layout (a rolling deploy).
        ns = redis_cache.namespace
        await redis_cache.client.set(f"{ns}:k@0", b"per-generation")
        assert await redis_cache.get_current("k") == (0, None)
        assert await redis_cache.set_current("k", 0, b"stamped") is True
        assert await redis_cache.client.get(f"{ns}:k@0") == b"per-generation"
        assert await redis_cache.get_current("k") == (0, b"stamped")

    async def test_a_generation_counter_expires_after_gen_ttl(self, redis_cache: RedisCache) -> None:
        gen_key = f"{redis_cache.namespace}:k#gen"
        await redis_cache.invalidate("k")
        assert GEN_TTL * 1000 - 5_000 < await redis_cache.client.pttl(gen_key) <= GEN_TTL * 1000
        await redis_cache.client.pexpire(gen_key, 60_000)
        await redis_cache.invalidate("k")  # every bump refreshes the expiry
        assert await redis_cache.client.pttl(gen_key) > 60_000

    async def test_storing_a_value_keeps_its_generation_counter_alive(self, redis_cache: RedisCache) -> None:
        gen_key = f"{redis_cache.namespace}:k#gen"
        await redis_cache.invalidate("k")
        await redis_cache.client.pexpire(gen_key, 60_000)
        await redis_cache.set_current("k", 1, b"v", ttl=GEN_TTL * 2)
        # Read the counter first: then "expires no earlier than the value" means a PTTL no smaller.
        gen_pttl = await redis_cache.client.pttl(gen_key)
        value_pttl = await redis_cache.client.pttl(f"{redis_cache.namespace}:k@")
        assert 0 < value_pttl <= GEN_TTL * 1000  # capped...
        assert gen_pttl >= value_pttl  # ...and outlived by its refreshed counter

    async def test_another_process_sees_an_invalidate(self, redis_cache: RedisCache) -> None:
        other = RedisCache.from_url(REDIS_URL, namespace=redis_cache.namespace)
        try:
            generation, _ = await other.get_current("k")
            assert await other.set_current("k", generation, b"v") is True
            assert await redis_cache.get_current("k") == (0, b"v")
            stale_generation, _ = await redis_cache.get_current("k")
            await other.invalidate("k")
            assert await redis_cache.get_current("k") == (1, None)
            assert await redis_cache.set_current("k", stale_generation, b"stale") is False
            assert await other.get_current("k") == (1, None)
        finally:
            await other.aclose()

    @pytest.mark.parametrize(
        "operation",
        [
            lambda c: c.get("k"),
            lambda c: c.get_many(["a", "b"]),
            lambda c: c.set("k", b"v", ttl=1),
            lambda c: c.add("k", b"v"),
            lambda c: c.delete("k"),
            lambda c: c.get_current("k"),
            lambda c: c.set_current("k", 0, b"v", ttl=1),
            lambda c: c.invalidate("a", "b"),
            lambda c: c.ping(),
        ],
        ids=["get", "get_many", "set", "add", "delete", "get_current", "set_current", "invalidate", "ping"],
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
