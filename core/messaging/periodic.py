"""Periodic jobs: housekeeping a module asks the worker to run every N seconds.

A module declares one with ``@periodic("<module>.<verb>", every="<settings field>")`` on an
``async def fn(ctx: PeriodicContext)`` and lists it in ``Module.periodic``. Each ``atrium worker``
runs each of its modules' periodic jobs in a loop on its jobs loop: one run at a time per worker,
``every`` seconds (the named setting) after the previous run ended; the first run comes one
interval after start-up. Several workers run the same job side by side, so a job must divide its
work safely: lock what it takes (``FOR UPDATE SKIP LOCKED``) and re-check it under the lock.

Core has periodic jobs of its own, named ``core.<verb>`` (``core.messaging.resubmit.CORE_PERIODIC``):
``atrium worker`` runs them beside the modules' with the root container as ``ctx.container``
(``containers`` maps ``CORE`` to it).

Unlike a dramatiq task there is no message, no retry and no inbox: a run that raises is logged and
the next run starts over. The job commits its own units of work (``ctx.unit_of_work()``), one per
piece of work, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.session import UnitOfWork
from core.messaging.queue import TASK_NAME


@dataclass(frozen=True, slots=True)
class PeriodicContext:
    """What a periodic job gets: its module's container and sessions for its own units of work."""

    container: Any  # the module's own sub-container
    sessions: async_sessionmaker[AsyncSession]

    def unit_of_work(self) -> UnitOfWork:
        """A transaction committed when the ``async with`` block ends without an error."""
        return UnitOfWork(self.sessions)


PeriodicFn = Callable[[PeriodicContext], Awaitable[None]]
CORE = "core"  # the prefix of core's own periodic jobs, and their container's key in the runner


@dataclass(frozen=True)
class Periodic:
    name: str
    fn: PeriodicFn
    every: str  # the settings field holding the seconds between runs

    @property
    def module(self) -> str:
        return self.name.split(".", 1)[0]


def periodic(name: str, *, every: str) -> Callable[[PeriodicFn], Periodic]:
    """Declare a periodic job run every ``settings.<every>`` seconds by each worker."""
    if not TASK_NAME.match(name):
        raise ValueError(f"periodic job name {name!r} must be '<module>.<verb>' in snake_case")

    def declare(fn: PeriodicFn) -> Periodic:
        if not inspect.iscoroutinefunction(fn) or len(inspect.signature(fn).parameters) != 1:
            raise TypeError(f"periodic job {name!r} must be 'async def fn(ctx: PeriodicContext)'")
        return Periodic(name, fn, every)

    return declare


class PeriodicRunner:
    """Runs periodic jobs on the running loop until ``stop``; each job in a loop of its own."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], containers: Mapping[str, Any],
                 jobs: Sequence[Periodic], settings: Any) -> None:
        self._sessions = sessions
        self._containers = containers
        self._jobs: list[tuple[Periodic, float]] = []
        for job in jobs:
            interval = getattr(settings, job.every, None)
            if not isinstance(interval, int | float) or interval <= 0:
                raise ValueError(f"periodic job {job.name!r}: setting {job.every!r} must be a positive "
                                 f"number of seconds (got {interval!r})")
            self._jobs.append((job, float(interval)))
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def names(self) -> list[str]:
        return [job.name for job, _ in self._jobs]

    def start(self) -> None:
        for job, interval in self._jobs:
            self._tasks.append(asyncio.create_task(self._loop(job, interval), name=job.name))

    async def stop(self) -> None:
        """Cancel the loops; a run in progress is cut short (its open unit of work rolls back)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def run_once(self, name: str) -> None:
        """One run of the job ``name`` now (tests, and the loop)."""
        job = next(j for j, _ in self._jobs if j.name == name)
        await job.fn(PeriodicContext(self._containers[job.module], self._sessions))

    async def _loop(self, job: Periodic, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_once(job.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next run starts over; never let the loop die
                logger.exception("periodic job {} failed: {}: {}", job.name, type(exc).__name__, exc)
