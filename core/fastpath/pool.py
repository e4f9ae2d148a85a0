"""The fast path's PostgreSQL pool: waiting checkouts served in arrival order, and a pre-ping
that costs a round trip only after a connection sat idle.

**FairQueuePool.**

SQLAlchemy's ``AsyncAdaptedQueuePool`` keeps its idle connections in an ``asyncio.Queue``. When
every connection is out, a request waits on the queue; when one comes back, the first waiter is
woken, but before it runs, a request that has just arrived may take the connection (an idle
connection is always taken at once). The woken waiter then finds the queue empty and waits
again, at the back of the line. Under sustained load beyond the pool, the unlucky waited for
many turns: ``POST /items`` at 64 connections with a pool of 20 had its p90 at 5x its median
(bench/README.md).

``FairQueue`` hands a returned connection straight to the longest waiter, and a newcomer only
takes an idle connection when nobody waits, so connections go out in arrival order.
``FairQueuePool`` is ``AsyncAdaptedQueuePool`` with that queue: every setting is the same.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import suppress
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import await_
from sqlalchemy.util.queue import Empty, Full, QueueCommon

T = TypeVar("T")


class FairQueue(QueueCommon[T], Generic[T]):
    """The pool's queue: idle items, and waiters served in arrival order by direct hand-over.

    Called from SQLAlchemy's greenlet-run pool code; waits with ``await_`` as
    ``sqlalchemy.util.queue.AsyncAdaptedQueue`` does.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T]] = deque()

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a waiter that timed out or was cancelled has left
                waiter.set_result(item)
                return
        if self.full():
            raise Full()
        self._items.append(item)

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        # Never blocks: the pool only returns what it gave out, so there is always room.
        self.put_nowait(item)

    def get_nowait(self) -> T:
        if not self._items:
            raise Empty()
        return self._items.pop() if self.use_lifo else self._items.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        if self._items:  # idle items exist only while nobody waits (put hands over directly)
            return self.get_nowait()
        if not block:
            raise Empty()
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await_(self._wait(waiter, timeout))
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed over in the same instant as the timeout or a cancellation: pass it on.
                self.put_nowait(waiter.result())
            else:
                waiter.cancel()
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Empty() from exc
            raise

    @staticmethod
    async def _wait(waiter: asyncio.Future[T], seconds: float | None) -> T:
        if seconds is None:
            return await waiter
        async with asyncio.timeout(seconds):
            return await waiter


class FairQueuePool(AsyncAdaptedQueuePool):
    """``AsyncAdaptedQueuePool`` serving waiting checkouts in arrival order (``FairQueue``)."""

    _queue_class: Any = FairQueue


class Pinger:
    """Pessimistic disconnect handling without a round trip per request.

    A connection the server closed (a restart, ``pg_terminate_backend``, an idle timeout) has its
    socket closed too, which asyncpg notices at once: ``is_closed()`` is checked on every checkout
    and the pool replaces such a connection before the request uses it. Only a connection idle for
    ``ping_after`` seconds or more (a socket a firewall may have dropped silently) also pays a ``;``
    round trip. A connection in steady use skips it: that round trip was a fifth of a database
    read's cost (bench/README.md). ``ping_after=0`` pings on every checkout.
    """

    _LAST_USED = "atrium.last_used"

    def __init__(self, ping_after: float) -> None:
        self.ping_after = ping_after

    def checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = dbapi_connection._connection
        if driver.is_closed():
            raise DisconnectionError("the server closed the connection")
        if time.monotonic() - record.info.get(self._LAST_USED, 0.0) < self.ping_after:
            return
        try:
            await_(driver.fetchrow(";"))  # bounded by the connection's command timeout
        except TimeoutError:
            # No answer at all: a hung server, not a restarted one, and a new connection would wait
            # on it just the same. Raised as it is (not as a DisconnectionError, which would make
            # the pool reconnect and wait again), the pool invalidates this connection, closed at
            # once by core.db.engine.drop_if_timed_out, and the request answers 503.
            raise
        except Exception as exc:
            raise DisconnectionError(f"pre-ping failed: {type(exc).__name__}: {exc}") from exc

    def checkin(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[self._LAST_USED] = time.monotonic()
