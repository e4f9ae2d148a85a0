"""One behavioural contract for every ``RateLimiter`` adapter: ``MemoryRateLimiter`` and
``RedisRateLimiter`` must count, refuse, recover and survive concurrency the same way."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import uuid4

import pytest

from core.ratelimit.limiter import (
    MemoryRateLimiter,
    NullRateLimiter,
    Policy,
    RateLimiter,
    RateLimiterUnavailable,
    RedisRateLimiter,
    parse_policy,
)
from tests.support.services import REDIS_URL, require

Elapse = Callable[[float], Awaitable[None]]
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once


class FakeClock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _purge(limiter: RedisRateLimiter, namespace: str) -> None:
    keys = [key async for key in limiter.client.scan_iter(match=f"{namespace}:*", count=500)]
    if keys:
        await limiter.client.delete(*keys)


@asynccontextmanager
async def _fresh_redis_limiter(namespace: str | None = None) -> AsyncIterator[RedisRateLimiter]:
    require("redis")
    namespace = namespace or f"atrium-test:{uuid4().hex}"
    limiter = RedisRateLimiter.from_url(REDIS_URL, namespace=namespace)
    try:
        yield limiter
    finally:
        await _purge(limiter, namespace)
        await limiter.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[RateLimiter]:
    if request.param == "memory":
        memory = MemoryRateLimiter(clock=clock)
        yield memory
        await memory.aclose()
    else:
        async with _fresh_redis_limiter() as redis_limiter:
            yield redis_limiter


@pytest.fixture
def elapse(limiter: RateLimiter, clock: FakeClock) -> Elapse:
    """Let ``seconds`` pass for ``limiter``: the fake clock for memory, real time for Redis."""

    async def _elapse(seconds: float) -> None:
        if isinstance(limiter, MemoryRateLimiter):
            clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    return _elapse


def policy(spec: str, name: str = "test") -> Policy:
    return parse_policy(name, spec)


async def hits(limiter: RateLimiter, key: str, p: Policy, n: int) -> list[bool]:
    return [(await limiter.hit(key, p)).allowed for _ in range(n)]


# --- the contract --------------------------------------------------------------------------------


class TestCounting:
    async def test_allows_exactly_the_limit_then_refuses(self, limiter: RateLimiter) -> None:
        five = policy("5/minute")
        decisions = [await limiter.hit("k", five) for _ in range(7)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert all(d.limit == 5 for d in decisions)

    async def test_remaining_counts_down_to_zero(self, limiter: RateLimiter) -> None:
        five = policy("5/minute")
        remaining = [(await limiter.hit("k", five)).remaining for _ in range(6)]
        assert remaining == [4, 3, 2, 1, 0, 0]

    async def test_a_refusal_says_when_to_retry(self, limiter: RateLimiter) -> None:
        five = policy("5/minute")  # one request earned back every 12 s
        await hits(limiter, "k", five, 5)
        refused = await limiter.hit("k", five)
        assert not refused.allowed
        assert 11.0 < refused.retry_after <= 12.0
        assert 59.0 < refused.reset_after <= 60.0  # the whole quota is back after a full period

    async def test_an_allowed_hit_needs_no_retry_and_reports_its_reset(self, limiter: RateLimiter) -> None:
        decision = await limiter.hit("k", policy("5/minute"))
        assert decision.allowed
        assert decision.retry_after == 0.0
        assert 11.0 < decision.reset_after <= 12.0

    async def test_a_refused_hit_is_not_counted(self, limiter: RateLimiter) -> None:
        five = policy("5/minute")
        await hits(limiter, "k", five, 5)
        first = await limiter.hit("k", five)
        for _ in range(20):
            await limiter.hit("k", five)
        last = await limiter.hit("k", five)
        assert last.retry_after <= first.retry_after  # hammering does not push the retry further out
        assert last.reset_after <= first.reset_after

    async def test_keys_are_independent(self, limiter: RateLimiter) -> None:
        two = policy("2/minute")
        assert await hits(limiter, "a", two, 3) == [True, True, False]
        assert await hits(limiter, "b", two, 3) == [True, True, False]
        assert await hits(limiter, "A", two, 1) == [True]  # keys are case-sensitive

    async def test_one_request_is_earned_back_after_the_interval(
        self, limiter: RateLimiter, elapse: Elapse
    ) -> None:
        # One back every second: wide enough that a loaded machine's pause between the two hits
        # below cannot earn a second request (5/second flaked under load on Redis's real clock).
        slow = policy("60/minute")
        await hits(limiter, "k", slow, 60)
        refused = await limiter.hit("k", slow)
        assert not refused.allowed
        assert 0 < refused.retry_after <= 1.0
        await elapse(refused.retry_after + 0.05)
        assert await hits(limiter, "k", slow, 2) == [True, False]

    async def test_the_full_quota_is_back_after_the_window(
        self, limiter: RateLimiter, elapse: Elapse
    ) -> None:
        fast = policy("5/second")
        assert (await hits(limiter, "k", fast, 6))[:5] == [True] * 5
        await elapse(1.1)
        started = time.monotonic()
        decisions = [await limiter.hit("k", fast) for _ in range(6)]
        took = time.monotonic() - started
        assert [d.allowed for d in decisions[:5]] == [True] * 5
        assert decisions[0].remaining == 4
        if took < 0.18:  # a loaded machine may take a whole interval (200 ms) and earn one back
            assert not decisions[5].allowed


class TestConcurrency:
    async def test_200_concurrent_hits_with_limit_50_allow_exactly_50(self, limiter: RateLimiter) -> None:
        fifty = policy("50/hour")
        decisions = await asyncio.gather(*(limiter.hit("hot", fifty) for _ in range(200)))
        assert sum(d.allowed for d in decisions) == 50
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))


class TestPolicy:
    @pytest.mark.parametrize(
        ("spec", "limit", "period"),
        [("600/minute", 600, 60.0), ("5/second", 5, 1.0), ("30/minutes", 30, 60.0), ("1/hour", 1, 3600.0),
         ("2/day", 2, 86_400.0), ("7/s", 7, 1.0), ("3/m", 3, 60.0), (" 10 / Hour ", 10, 3600.0)],
    )
    def test_specs_parse(self, spec: str, limit: int, period: float) -> None:
        parsed = parse_policy("g", spec)
        assert (parsed.name, parsed.limit, parsed.period) == ("g", limit, period)

    @pytest.mark.parametrize("spec", ["", "600", "0/minute", "-1/minute", "5/week", "5/ms", "five/minute",
                                      "5/minute/2", "1.5/second"])
    def test_bad_specs_are_refused_in_one_line(self, spec: str) -> None:
        with pytest.raises(ValueError, match="N/second") as caught:
            parse_policy("g", spec)
        assert "\n" not in str(caught.value)

    def test_the_interval_never_allows_more_than_the_limit(self) -> None:
        seven = parse_policy("g", "7/second")
        assert seven.period_us >= 1_000_000
        assert seven.interval_us * 7 == seven.period_us


# --- memory --------------------------------------------------------------------------------------


class TestMemoryRateLimiter:
    async def test_exact_times_on_a_fake_clock(self, clock: FakeClock) -> None:
        limiter = MemoryRateLimiter(clock=clock)
        five = policy("5/minute")
        await hits(limiter, "k", five, 5)
        refused = await limiter.hit("k", five)
        assert (refused.retry_after, refused.reset_after) == (12.0, 60.0)
        clock.advance(11.999)
        assert not (await limiter.hit("k", five)).allowed
        clock.advance(0.001)
        assert (await limiter.hit("k", five)).allowed

    async def test_finished_keys_are_swept(self, clock: FakeClock) -> None:
        limiter = MemoryRateLimiter(clock=clock)
        for i in range(100):
            await limiter.hit(f"k{i}", policy("5/minute"))
        clock.advance(61)
        await limiter.hit("fresh", policy("5/minute"))
        assert len(limiter) == 1

    async def test_the_number_of_keys_is_capped(self, clock: FakeClock) -> None:
        limiter = MemoryRateLimiter(clock=clock, max_keys=100)
        for i in range(1_000):
            await limiter.hit(f"k{i}", policy("5/minute"))
        assert len(limiter) <= 100
        assert not (await limiter.hit("k999", policy("1/minute"))).allowed  # recent keys are kept

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_keys"):
            MemoryRateLimiter(max_keys=0)


class TestNullRateLimiter:
    async def test_every_hit_is_allowed(self) -> None:
        limiter = NullRateLimiter()
        one = policy("1/hour")
        decisions = [await limiter.hit("k", one) for _ in range(10)]
        assert all(d.allowed and d.remaining == 1 for d in decisions)
        assert await limiter.ping() is None
        await limiter.aclose()


# --- redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def redis_limiter() -> AsyncIterator[RedisRateLimiter]:
    async with _fresh_redis_limiter() as limiter:
        yield limiter


class TestRedisRateLimiter:
    async def test_keys_live_under_the_namespace_with_the_ttl_of_their_window(
        self, redis_limiter: RedisRateLimiter
    ) -> None:
        ten = policy("10/minute")  # 6 s per request
        await redis_limiter.hit("k", ten)
        key = redis_limiter.key("k")
        assert key.endswith(":rl:k")
        assert 5_000 < await redis_limiter.client.pttl(key) <= 6_000
        await hits(redis_limiter, "k", ten, 9)
        assert 59_000 < await redis_limiter.client.pttl(key) <= 60_000
        await redis_limiter.hit("k", ten)  # refused: no write, the TTL only runs down
        assert await redis_limiter.client.pttl(key) <= 60_000
        assert await redis_limiter.client.exists("k") == 0

    async def test_keys_disappear_when_the_window_is_over(self, redis_limiter: RedisRateLimiter) -> None:
        await redis_limiter.hit("k", policy("5/second"))
        deadline = time.monotonic() + 2.0
        while await redis_limiter.client.exists(redis_limiter.key("k")):
            assert time.monotonic() < deadline, "the key outlived its window"
            await asyncio.sleep(0.05)

    async def test_concurrent_hits_from_two_connections_allow_exactly_the_limit(
        self, redis_limiter: RedisRateLimiter
    ) -> None:
        other = RedisRateLimiter.from_url(REDIS_URL, namespace=redis_limiter.namespace)
        fifty = policy("50/hour")
        try:
            decisions = await asyncio.gather(
                *(limiter.hit("hot", fifty) for _ in range(100) for limiter in (redis_limiter, other))
            )
        finally:
            await other.aclose()
        assert len(decisions) == 200
        assert sum(d.allowed for d in decisions) == 50

    async def test_namespaces_do_not_share_counts(self, redis_limiter: RedisRateLimiter) -> None:
        async with _fresh_redis_limiter() as other:
            assert await hits(redis_limiter, "k", policy("1/minute"), 2) == [True, False]
            assert await hits(other, "k", policy("1/minute"), 1) == [True]

    @pytest.mark.parametrize(
        "operation",
        [lambda limiter: limiter.hit("k", policy("5/minute")), lambda limiter: limiter.ping()],
        ids=["hit", "ping"],
    )
    async def test_an_unreachable_server_raises_rate_limiter_unavailable_quickly(
        self, operation: Callable[[RedisRateLimiter], Awaitable[object]]
    ) -> None:
        limiter = RedisRateLimiter.from_url(DEAD_REDIS, namespace="unreachable")
        started = time.monotonic()
        try:
            with pytest.raises(RateLimiterUnavailable) as caught:
                await operation(limiter)
        finally:
            await limiter.aclose()
        assert time.monotonic() - started < 2.0
        assert caught.value.__cause__ is not None  # the driver's error stays inspectable

    async def test_a_hung_server_times_out_instead_of_blocking(self) -> None:
        # Accepts TCP connections (via the kernel backlog) but never answers a command.
        with socket.create_server(("127.0.0.1", 0)) as hung:
            port = hung.getsockname()[1]
            limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.2)
            started = time.monotonic()
            try:
                with pytest.raises(RateLimiterUnavailable):
                    await limiter.hit("k", policy("5/minute"))
            finally:
                await limiter.aclose()
        assert time.monotonic() - started < 1.5
