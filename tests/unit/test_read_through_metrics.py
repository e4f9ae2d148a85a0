"""Read-through caches on one metrics registry share one counter, one ``cache`` label each."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from core.cache.read_through import ReadThroughCache
from core.cache.stores import MemoryCache


async def test_two_caches_on_one_registry_count_apart() -> None:
    registry = CollectorRegistry()
    items = ReadThroughCache(MemoryCache(), registry, name="items", ttl=60)
    sessions = ReadThroughCache(MemoryCache(), registry, name="auth-session", ttl=60)

    async def load() -> bytes:
        return b"value"

    await items.get(1, load)  # a miss, then a hit
    await items.get(1, load)
    await sessions.get(1, load)  # a miss

    def count(cache: str, result: str) -> float | None:
        return registry.get_sample_value("atrium_cache_requests_total", {"cache": cache, "result": result})

    assert (count("items", "miss"), count("items", "hit")) == (1.0, 1.0)
    assert (count("auth-session", "miss"), count("auth-session", "hit")) == (1.0, 0.0)
