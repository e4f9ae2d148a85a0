"""Read replicas: sessions for read-only use cases spread over the replicas, the primary as fallback."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from loguru import logger
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core.db.engine import database_unavailable
from core.db.session import session_factory


class ReadSessions:
    """Sessions for read-only use cases: round-robin over the read replicas, else the primary.

    ``open()`` checks a connection out before handing the session over (the pool pre-pings it), so
    a replica that is down is noticed there: it is skipped for ``cooloff`` seconds (logged once per
    outage), the read goes to the next replica and finally to the primary. A replica outage makes
    reads land on the primary; it never fails them. With no replicas every read session is a
    primary session. The caller rolls back (closes) a read session; nothing commits it.
    """

    def __init__(
        self,
        primary: async_sessionmaker[AsyncSession],
        replicas: Sequence[AsyncEngine] = (),
        *,
        cooloff: float = 5.0,
    ) -> None:
        self.primary = primary
        self._replicas = [session_factory(engine) for engine in replicas]
        self._names = [engine.url.render_as_string(hide_password=True) for engine in replicas]
        self._down_until = [0.0] * len(self._replicas)
        self._cooloff = cooloff
        self._turn = itertools.count()

    @property
    def replicated(self) -> bool:
        return bool(self._replicas)

    def _candidates(self) -> list[int]:
        """Replica indexes to try, round-robin, leaving out those in their cool-off."""
        count = len(self._replicas)
        if not count:
            return []
        start, now = next(self._turn) % count, time.monotonic()
        return [i for i in ((start + k) % count for k in range(count)) if self._down_until[i] <= now]

    def __call__(self) -> AsyncSession:
        """A session on the next replica not known to be down (no connection check), else the primary."""
        candidates = self._candidates()
        return self._replicas[candidates[0]]() if candidates else self.primary()

    async def open(self) -> AsyncSession:
        """A session whose connection is already checked out: a replica's that answers, else the primary's."""
        for index in self._candidates():
            session = self._replicas[index]()
            try:
                await session.connection()
            except Exception as exc:
                await _close_quietly(session)
                if not database_unavailable(exc):
                    raise
                self._mark_down(index, exc)
                continue
            if self._down_until[index]:
                logger.info("read replica {} is back; reads go to it again", self._names[index])
                self._down_until[index] = 0.0
            return session
        return self.primary()

    def _mark_down(self, index: int, exc: BaseException) -> None:
        if self._down_until[index] == 0.0:
            logger.warning("read replica {} unavailable ({}); its reads go to the primary for {:.0f}s",
                           self._names[index], type(exc).__name__, self._cooloff)
        else:
            logger.info("read replica {} still unavailable ({})", self._names[index], type(exc).__name__)
        self._down_until[index] = time.monotonic() + self._cooloff


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception as exc:  # the connection is already gone; nothing to give back
        logger.debug("closing a failed read session: {}", type(exc).__name__)


