"""The cache port, so callers depend on "a fast, lossy key-value store" and not on Redis.

A cache is an optimisation: every caller must cope with a miss, so a value that expired, was
evicted or no longer matches today's schema all read as ``None``. What callers must *not* see is a
driver-specific exception: an unreachable store surfaces as one ``CacheUnavailable`` so the caller
can decide to degrade (skip the cache) instead of failing the request. ``MemoryCache`` exists so
tests and single-process development run the same code path without a server.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError

T = TypeVar("T")


class CacheUnavailable(Exception):
    """The cache backend could not be reached or refused the command."""


class Cache(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...
    async def add(self, key: str, value: bytes, ttl: float | None = None) -> bool: ...
    async def delete(self, *keys: str) -> int: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


def _check_ttl(ttl: float | None) -> None:
    # A zero or negative TTL is almost always a bug (Redis rejects it too); fail loudly and alike.
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")


class MemoryCache:
    """In-process LRU cache; expiry is checked lazily on access against ``clock``."""

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        # key -> (value, absolute expiry on ``clock`` or None); order is least- to most-recently used.
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and self._clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def _store(self, key: str, value: bytes, ttl: float | None) -> None:
        expires_at = None if ttl is None else self._clock() + ttl
        self._entries[key] = (bytes(value), expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._live(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_ttl(ttl)
        self._store(key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_ttl(ttl)
        if self._live(key) is not None:
            return False
        self._store(key, value, ttl)
        return True

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in dict.fromkeys(keys):  # a key named twice is removed once, as in Redis
            if self._live(key) is not None:
                del self._entries[key]
                removed += 1
        return removed

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise CacheUnavailable(f"redis cache error: {exc}") from exc


class RedisCache:
    """Redis-backed cache; every key lives under ``f"{namespace}:"`` so apps can share a server."""

    def __init__(self, client: aioredis.Redis, namespace: str = "atrium") -> None:
        self._client = client
        self._namespace = namespace

    @classmethod
    def from_url(cls, url: str, namespace: str = "atrium", socket_timeout: float = 0.5) -> RedisCache:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
        return cls(client, namespace=namespace)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def namespace(self) -> str:
        return self._namespace

    def _key(self, key: str) -> str:
        return f"{self._namespace}:{key}"

    async def get(self, key: str) -> bytes | None:
        with _unavailable_on_error():
            return await self._client.get(self._key(key))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with _unavailable_on_error():
            return list(await self._client.mget([self._key(key) for key in keys]))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_ttl(ttl)
        with _unavailable_on_error():
            await self._client.set(self._key(key), value, px=_millis(ttl))

    async def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_ttl(ttl)
        with _unavailable_on_error():
            return bool(await self._client.set(self._key(key), value, px=_millis(ttl), nx=True))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        with _unavailable_on_error():
            return int(await self._client.delete(*(self._key(key) for key in keys)))

    async def ping(self) -> None:
        with _unavailable_on_error():
            await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()


def _millis(ttl: float | None) -> int | None:
    # Floor at 1 ms so a sub-millisecond TTL still yields an expiry Redis accepts.
    return None if ttl is None else max(1, int(ttl * 1000))


class TypedCache(Generic[T]):
    """A typed view over a ``Cache``: values are JSON via pydantic, keys share one ``prefix``."""

    def __init__(self, cache: Cache, type_: Any, prefix: str, ttl: float | None) -> None:
        _check_ttl(ttl)
        self._cache = cache
        self._adapter: TypeAdapter[T] = TypeAdapter(type_)
        self._prefix = prefix
        self._ttl = ttl

    def _key(self, key: str) -> str:
        return f"{self._prefix}:{key}"

    async def get(self, key: str) -> T | None:
        raw = await self._cache.get(self._key(key))
        if raw is None:
            return None
        try:
            return self._adapter.validate_json(raw)
        except ValidationError:
            # Written by an older (or newer) schema: recompute rather than fail the request.
            return None

    async def set(self, key: str, value: T) -> None:
        await self._cache.set(self._key(key), self._adapter.dump_json(value), ttl=self._ttl)

    async def delete(self, key: str) -> None:
        await self._cache.delete(self._key(key))
