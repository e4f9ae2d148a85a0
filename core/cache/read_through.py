"""Cache-aside for single items, safe against stale reads, stampedes and a dead cache.

- Entries are generation-guarded (``Cache.get_current`` / ``set_current`` / ``invalidate``): a
  write bumps the key's generation after commit, so a reader that loaded the old row before
  the write can't store it under the new generation — in this process or any other.
- Concurrent misses on one key in this process share one load (single flight).
- When the cache fails, reads go straight to the database for a short cool-off instead of
  paying a timeout per request; hits, misses, errors and bypasses are Prometheus counters.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable

from loguru import logger
from prometheus_client import CollectorRegistry, Counter

from core.cache.stores import Cache, CacheUnavailable

Loader = Callable[[], Awaitable[bytes | None]]


# One counter per registry, shared by every cache built on it (each is a ``cache`` label).
_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _requests_counter(registry: CollectorRegistry) -> Counter:
    counter = _COUNTERS.get(registry)
    if counter is None:
        counter = _COUNTERS[registry] = Counter(
            "atrium_cache_requests",
            "Read-through cache lookups by outcome.",
            ["cache", "result"],
            registry=registry,
        )
    return counter


class ReadThroughCache:
    def __init__(
        self, cache: Cache, registry: CollectorRegistry, *, name: str, ttl: float, cooloff: float = 5.0
    ) -> None:
        self._cache = cache
        self._name = name
        self._ttl = ttl
        self._cooloff = cooloff
        self._down_until = 0.0
        # Keyed by generation too: a read that starts after a write must not join a load that
        # began before it (that load may return the old row).
        self._inflight: dict[tuple[str, int], asyncio.Future[bytes | None]] = {}
        counter = _requests_counter(registry)
        self._hit, self._miss, self._error, self._bypass = (
            counter.labels(name, r) for r in ("hit", "miss", "error", "bypass")
        )

    def key(self, ident: object) -> str:
        return f"{self._name}:{ident}"

    async def get(self, ident: object, load: Loader) -> bytes | None:
        """The cached value, else ``load()`` (once per key at a time), stored for next time."""
        key = self.key(ident)
        if time.monotonic() < self._down_until:
            self._bypass.inc()
            return await load()
        try:
            generation, value = await self._cache.get_current(key)
        except CacheUnavailable as exc:
            self._failed(exc)
            return await load()
        if value is not None:
            self._hit.inc()
            return value
        self._miss.inc()
        return await self._load_once(key, generation, load)

    async def _load_once(self, key: str, generation: int, load: Loader) -> bytes | None:
        flight = (key, generation)
        pending = self._inflight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            value = await load()
            if value is not None:
                try:
                    await self._cache.set_current(key, generation, value, self._ttl)
                except CacheUnavailable as exc:
                    self._failed(exc)
            future.set_result(value)
            return value
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._inflight[flight]

    async def invalidate(self, ident: object) -> None:
        try:
            await self._cache.invalidate(self.key(ident))
        except CacheUnavailable as exc:
            # Reads bypass the cache during the cool-off; entries left behind expire with their TTL.
            self._failed(exc)

    def _failed(self, exc: CacheUnavailable) -> None:
        self._error.inc()
        if time.monotonic() >= self._down_until:
            logger.warning(
                "cache {} unavailable ({}); bypassing it for {:.0f}s", self._name, exc, self._cooloff
            )
        self._down_until = time.monotonic() + self._cooloff
