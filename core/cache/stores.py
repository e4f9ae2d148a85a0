"""The cache port, so callers depend on "a fast, lossy key-value store" and not on Redis.

A cache is an optimisation: every caller must cope with a miss, so a value that expired, was
evicted or no longer matches today's schema all read as ``None``. What callers must *not* see is a
driver-specific exception: an unreachable store surfaces as one ``CacheUnavailable`` so the caller
can decide to degrade (skip the cache) instead of failing the request. ``MemoryCache`` exists so
tests and single-process development run the same code path without a server; ``NullCache`` runs
the same code with the cache turned off.

Generation-guarded entries (``get_current`` / ``set_current`` / ``invalidate``) make cache-aside
reads safe against a concurrent write: logical key ``K`` has a counter at ``K#gen`` (missing = 0)
and its value belongs to one generation. A reader notes the generation *before* loading from the
source of truth and may store only under that generation if it is still current; a writer's
``invalidate`` bumps the counter, so a reader that loaded stale data before the write can no longer
store it. In Redis the value lives at ``K@`` prefixed with its generation (``b"<gen>:<value>"``),
so the hot read is one ``MGET`` of counter and value, which Redis answers atomically without a
script (a Lua call cost Redis ~13 µs of CPU per read; bench/README.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar, cast, overload

import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError, ResponseError

T = TypeVar("T")

GEN_TTL = 7 * 24 * 3600.0
"""Seconds a generation counter lives after its last bump or store; a guarded value never lives
longer (``set_current`` caps its ttl here and refreshes the counter), so a counter can expire and
restart at 0 only once no value stored under one of its generations is left to resurrect."""


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

    async def get_current(self, key: str) -> tuple[int, bytes | None]:
        """``key``'s current generation and the value stored for it (``None`` on a miss)."""
        ...

    async def set_current(self, key: str, generation: int, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` for ``generation`` only if it is still current; return whether it was.

        ``ttl`` is capped at ``GEN_TTL`` (``None`` means ``GEN_TTL``)."""
        ...

    async def invalidate(self, *keys: str) -> None:
        """Bump each key's generation and drop the value of the old one."""
        ...


def _check_ttl(ttl: float | None) -> None:
    # A zero or negative TTL is almost always a bug (Redis rejects it too); fail loudly and alike.
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")


def _guarded_ttl(ttl: float | None) -> float:
    _check_ttl(ttl)
    return GEN_TTL if ttl is None else min(ttl, GEN_TTL)


def _check_generation(generation: int) -> None:
    if generation < 0:
        raise ValueError(f"generation must be a value returned by get_current, got {generation!r}")


class MemoryCache:
    """In-process LRU cache; expiry is checked lazily on access against ``clock``."""

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        # key -> (value, absolute expiry on ``clock`` or None); order is least- to most-recently used.
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        # Generation counters, in their own LRU of the same capacity (they do not count as entries).
        # Only ``K@<current gen>`` can hold a guarded value (``invalidate`` deletes the old one), so
        # evicting a counter drops that one value and its restart at 0 reveals nothing stale.
        self._generations: OrderedDict[str, int] = OrderedDict()

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

    def _generation(self, key: str) -> int:
        generation = self._generations.get(key)
        if generation is None:
            return 0
        self._generations.move_to_end(key)
        return generation

    async def get_current(self, key: str) -> tuple[int, bytes | None]:
        generation = self._generation(key)
        return generation, self._live(_value_key(key, generation))

    async def set_current(self, key: str, generation: int, value: bytes, ttl: float | None = None) -> bool:
        _check_generation(generation)
        ttl = _guarded_ttl(ttl)
        if generation != self._generation(key):
            return False
        self._store(_value_key(key, generation), value, ttl)
        return True

    async def invalidate(self, *keys: str) -> None:
        for key in dict.fromkeys(keys):
            old = self._generations.pop(key, 0)
            self._entries.pop(_value_key(key, old), None)
            self._generations[key] = old + 1
            while len(self._generations) > self._max_entries:
                evicted, generation = self._generations.popitem(last=False)
                self._entries.pop(_value_key(evicted, generation), None)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()
        self._generations.clear()


def _value_prefix(key: str) -> str:
    return f"{key}@"


def _value_key(key: str, generation: int) -> str:
    return f"{_value_prefix(key)}{generation}"


def _gen_key(key: str) -> str:
    return f"{key}#gen"


class NullCache:
    """The cache turned off: every read misses and every write is dropped (but still validated)."""

    async def get(self, key: str) -> bytes | None:
        return None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_ttl(ttl)

    async def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_ttl(ttl)
        return False

    async def delete(self, *keys: str) -> int:
        return 0

    async def get_current(self, key: str) -> tuple[int, bytes | None]:
        return 0, None

    async def set_current(self, key: str, generation: int, value: bytes, ttl: float | None = None) -> bool:
        _check_generation(generation)
        _check_ttl(ttl)
        return False

    async def invalidate(self, *keys: str) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise CacheUnavailable(f"redis cache error: {exc}") from exc


# KEYS[1] = K#gen, KEYS[2] = K@; ARGV = generation, b"<generation>:<value>", ttl ms, GEN_TTL ms.
# Storing refreshes the counter's expiry so it outlives the value just stored.
_SET_CURRENT = """
local generation = redis.call('GET', KEYS[1]) or '0'
if generation ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if generation ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""

# KEYS = K#gen for each key; ARGV[1] = GEN_TTL ms, ARGV[i + 1] = "K@" for KEYS[i]. The value is
# deleted too: it belongs to the old generation, which nobody may read any more.
_INVALIDATE = """
for i, gen_key in ipairs(KEYS) do
    redis.call('INCR', gen_key)
    redis.call('PEXPIRE', gen_key, ARGV[1])
    redis.call('DEL', ARGV[i + 1])
end
return 0
"""


def _stamped(generation: int, value: bytes) -> bytes:
    return b"%d:%s" % (generation, value)


def _unstamped(generation: int, stored: bytes | None) -> bytes | None:
    """``stored``'s value if it was stored for ``generation``, else None (an older one's, or none)."""
    if stored is None:
        return None
    stamp = b"%d:" % generation
    return stored[len(stamp):] if stored.startswith(stamp) else None


class RedisCache:
    """Redis-backed cache; every key lives under ``f"{namespace}:"`` so apps can share a server."""

    def __init__(self, client: aioredis.Redis, namespace: str = "atrium", *, pipelined: bool = False) -> None:
        self._client = client
        self._namespace = namespace
        # Registering is local; each call runs EVALSHA and loads the script on NOSCRIPT.
        # With the fast path, the hot read goes through one lean pipelined connection instead of
        # redis-py's pool (core.fastpath.redis).
        self._fast: Any = None
        if pipelined:
            from core.fastpath.redis import PipelinedConnection

            self._fast = PipelinedConnection.like(client)
        self._set_current = client.register_script(_SET_CURRENT)
        self._invalidate = client.register_script(_INVALIDATE)

    @classmethod
    def from_url(cls, url: str, namespace: str = "atrium", socket_timeout: float = 0.5,
                 max_connections: int = 1024, *, pipelined: bool = False) -> RedisCache:
        # redis-py's asyncio pool refuses a 101st concurrent command by default ("Too many
        # connections"), which a burst of requests reaches easily and which would trip the read
        # cache's cool-off. Redis serves thousands of clients; the request count bounds this.
        client = aioredis.Redis.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            # A burst opens many connections at once; on a busy host their handshakes can take
            # longer than a command may. Refused connections (Redis down) still fail at once.
            socket_connect_timeout=max(socket_timeout, 2.0),
            health_check_interval=30,
        )
        return cls(client, namespace=namespace, pipelined=pipelined)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def namespace(self) -> str:
        return self._namespace

    def _key(self, key: str) -> str:
        return f"{self._namespace}:{key}"

    async def get(self, key: str) -> bytes | None:
        with _unavailable_on_error():  # the client does not decode responses: bytes, not str
            return cast("bytes | None", await self._client.get(self._key(key)))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with _unavailable_on_error():
            return list(cast("list[bytes | None]", await self._client.mget([self._key(k) for k in keys])))

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

    async def get_current(self, key: str) -> tuple[int, bytes | None]:
        full = self._key(key)
        with _unavailable_on_error():
            if self._fast is None:
                keys = [_gen_key(full), _value_prefix(full)]
                reply = cast("list[bytes | None]", await self._client.mget(keys))
            else:
                reply = await self._fast.execute("MGET", _gen_key(full), _value_prefix(full))
                if isinstance(reply, ResponseError):
                    raise reply
        counter, stored = reply
        generation = 0 if counter is None else int(counter)
        return generation, _unstamped(generation, stored)

    async def set_current(self, key: str, generation: int, value: bytes, ttl: float | None = None) -> bool:
        _check_generation(generation)
        ttl = _guarded_ttl(ttl)
        full = self._key(key)
        with _unavailable_on_error():
            stored = await self._set_current(
                keys=[_gen_key(full), _value_prefix(full)],
                args=[str(generation), _stamped(generation, value), _millis(ttl), _millis(GEN_TTL)],
            )
        return bool(stored)

    async def invalidate(self, *keys: str) -> None:
        unique = [self._key(key) for key in dict.fromkeys(keys)]
        if not unique:
            return
        with _unavailable_on_error():
            await self._invalidate(
                keys=[_gen_key(full) for full in unique],
                args=[_millis(GEN_TTL), *(_value_prefix(full) for full in unique)],
            )

    async def ping(self) -> None:
        with _unavailable_on_error():
            await self._client.ping()

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        await self._client.aclose()


@overload
def _millis(ttl: float) -> int: ...
@overload
def _millis(ttl: None) -> None: ...
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
