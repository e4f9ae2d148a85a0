"""What a session may do now (``core.security.AuthorityStore``), read on every authenticated request.

Three layers, so a request pays a dict lookup and a revocation still reaches every API process
within ``auth_cache_seconds`` (at most 1 s):

- L1, in this process: session id -> its authority, kept ``local_seconds``. A hit is a dict lookup
  and a clock read. An entry is dated from *before* its load began, so whatever was committed
  before the load is in it and nothing stale outlives a change by more than ``local_seconds``.
- L2, the shared cache (Redis in production): one generation-guarded entry per session
  (``core.cache.read_through.ReadThroughCache``). Every change that affects a session invalidates
  its entry after commit (``forget``), so a reader that loaded the old row cannot store it.
- L3, the database: the session row joined with its account.

An entry holds the account's role and state and whether the session was revoked, so a demotion, a
disabled account, a logout or a reused refresh token all end by the same invalidation. A session
that does not exist is remembered too (it never comes back). Should the invalidation itself fail
(the cache unreachable from this process alone), entries expire from L2 after ``shared_seconds``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable, Collection

import orjson
from loguru import logger
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.read_through import ReadThroughCache
from core.cache.stores import Cache, CacheUnavailable
from core.security import Principal, SessionAuthority
from modules.users.repository import SessionRepository

_NO_SESSION = b"-"  # the L2 value of a session id the database does not know
SHARED_SECONDS = 30.0


class SessionAuthorities:
    """The users module's ``AuthorityStore``: L1 in-process, L2 shared cache, L3 the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        cache: Cache,
        repository: SessionRepository,
        registry: CollectorRegistry,
        *,
        local_seconds: float,
        shared_seconds: float = SHARED_SECONDS,
        max_local: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._repository = repository
        self._local_seconds = local_seconds
        self._shared_seconds = shared_seconds
        self._max_local = max_local
        self._clock = clock
        # Its lookups are counted in atrium_cache_requests{cache="auth-session"}.
        self._shared = ReadThroughCache(cache, registry, name="auth-session", ttl=shared_seconds)
        self._local: dict[uuid.UUID, tuple[SessionAuthority | None, float]] = {}
        self._inflight: dict[uuid.UUID, asyncio.Future[SessionAuthority | None]] = {}
        self._forgotten = 0  # bumped by forget(): a load that began before it keeps nothing in L1

    async def authority(self, session_id: uuid.UUID) -> SessionAuthority | None:
        """The session's authority now (within ``local_seconds``), or None if it does not exist."""
        entry = self._local.get(session_id)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        pending = self._inflight.get(session_id)
        if pending is not None:  # one load per session at a time in this process
            return await asyncio.shield(pending)
        return await self._load(session_id)

    async def _load(self, session_id: uuid.UUID) -> SessionAuthority | None:
        started, epoch = self._clock(), self._forgotten
        future: asyncio.Future[SessionAuthority | None] = asyncio.get_running_loop().create_future()
        self._inflight[session_id] = future
        try:
            raw = await self._shared.get(session_id, functools.partial(self._read, session_id))
            value = _decode(session_id, raw)
            if self._local_seconds > 0 and epoch == self._forgotten:
                if len(self._local) >= self._max_local:
                    self._prune()
                self._local[session_id] = (value, started + self._local_seconds)
            future.set_result(value)
            return value
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            if self._inflight.get(session_id) is future:
                del self._inflight[session_id]

    async def _read(self, session_id: uuid.UUID) -> bytes:
        row = await self._repository.authority(self._engine, session_id)
        if row is None:
            return _NO_SESSION
        return orjson.dumps([str(row["user_id"]), bool(row["is_admin"]), bool(row["is_active"]),
                             row["revoked_at"] is not None])

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, (_, until) in self._local.items() if until <= now]:
            del self._local[key]
        if len(self._local) >= self._max_local:
            self._local.clear()

    async def forget(self, session_ids: Collection[uuid.UUID]) -> None:
        """Drop what this process and the shared cache hold of these sessions (after a commit that
        changed them or their account); every other process follows within ``local_seconds``."""
        if not session_ids:
            return
        self._forgotten += 1
        for session_id in session_ids:
            self._local.pop(session_id, None)
            self._inflight.pop(session_id, None)  # later requests start a load of their own
        try:
            await self._cache.invalidate(*(self._shared.key(s) for s in session_ids))
        except CacheUnavailable as exc:
            logger.warning("could not invalidate {} cached session(s) ({}); other processes may use "
                           "them for up to {:.0f}s", len(session_ids), exc, self._shared_seconds)


def _decode(session_id: uuid.UUID, raw: bytes | None) -> SessionAuthority | None:
    if raw is None or raw == _NO_SESSION:
        return None
    user_id, is_admin, active, revoked = orjson.loads(raw)
    principal = Principal(uuid.UUID(user_id), bool(is_admin), session_id)
    return SessionAuthority(principal, active=bool(active), revoked=bool(revoked))
