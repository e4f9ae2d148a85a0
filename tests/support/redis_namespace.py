"""Cleaning up after a test's own Redis namespace (cache, broker, rate limits) on the shared server."""

from __future__ import annotations

from tests.support.services import REDIS_URL


async def flush_redis_namespace(namespace: str) -> None:
    """Delete every key of ``namespace`` on the server at ``REDIS_URL``."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
