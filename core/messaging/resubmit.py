"""Sending again what the publication registry says never completed, and the registry's report.

``Resubmitter.resubmit`` picks publications still ``published`` or ``resubmitted`` (with ``failed``
ones only when asked) whose message left longer ago than a threshold, sends the same message again
(same outbox message id, payload, task and request id: the job's inbox turns a duplicate into a
no-op) and only then marks them ``resubmitted``: a mark lost to a crash costs one more harmless send.
On PostgreSQL the rows are taken ``FOR UPDATE SKIP LOCKED``, so two workers never resubmit the same
one at once, and a job finishing meanwhile waits for the mark and then writes ``completed`` over it.

Each worker runs ``core.resubmit_publications`` every ``outbox_resubmit_interval_seconds``: at most
``outbox_resubmit_limit`` resubmissions per message, never a failed one (an operator decides, with
``atrium outbox resubmit --failed``), and completed rows older than the retention are deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, cast

from loguru import logger
from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.base import utcnow
from core.messaging import publications
from core.messaging.outbox import OutboxMessage
from core.messaging.periodic import PeriodicContext, periodic
from core.messaging.publications import COMPLETED, FAILED, PUBLISHED, RESUBMITTED, EventPublication
from core.observability.tracing import quiet

if TYPE_CHECKING:
    from core.observability.metrics import OutboxMetrics


class Sender(Protocol):
    """What sends a row's message to one task again (``OutboxRelay.resend``)."""

    async def resend(self, row: OutboxMessage, task: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Resubmission:
    """One publication the resubmitter sent again (or would have, in a dry run, or could not)."""

    message_id: uuid.UUID
    task: str
    status: str  # before this resubmission
    age_seconds: float  # since the message last left for the broker
    resubmissions: int  # after this one
    error: str | None = None  # set when it could not be sent (it is then marked failed)


class Resubmitter:
    """Sends stale incomplete publications again; one transaction per batch."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], sender: Sender, *,
                 metrics: OutboxMetrics | None = None, batch_size: int = 100) -> None:
        self._sessions = sessions
        self._sender = sender
        self._metrics = metrics
        self._batch_size = batch_size

    async def resubmit(self, *, older_than: float, limit: int | None = None, include_failed: bool = False,
                       message_id: uuid.UUID | None = None, dry_run: bool = False) -> list[Resubmission]:
        """Resubmit what was last sent more than ``older_than`` seconds ago and has been resubmitted
        fewer than ``limit`` times (any number: None); ``message_id``: only that message's, at any age."""
        statuses: tuple[str, ...] = (PUBLISHED, RESUBMITTED)
        if include_failed or message_id is not None:  # an operator's choice, never the worker's
            statuses = (PUBLISHED, RESUBMITTED, FAILED)
        cutoff = utcnow() - timedelta(seconds=older_than)
        done: list[Resubmission] = []
        seen: set[uuid.UUID] = set()  # rows this call handled: a failed send must not come round again
        while True:
            batch = await self._batch(statuses, cutoff, limit, message_id, seen, dry_run)
            done.extend(batch)
            if len(batch) < self._batch_size:
                return done

    async def _batch(self, statuses: Sequence[str], cutoff: datetime, limit: int | None,
                     message_id: uuid.UUID | None, seen: set[uuid.UUID], dry_run: bool) -> list[Resubmission]:
        sent_at = func.coalesce(EventPublication.resubmitted_at, EventPublication.published_at,
                                EventPublication.failed_at)
        stmt = (select(EventPublication, OutboxMessage)
                .join(OutboxMessage, OutboxMessage.id == EventPublication.message_id)
                .where(EventPublication.status.in_(statuses))
                .order_by(sent_at, EventPublication.id)
                .limit(self._batch_size))
        if message_id is not None:
            stmt = stmt.where(EventPublication.message_id == message_id)
        else:
            stmt = stmt.where(sent_at < cutoff)
        if limit is not None:
            stmt = stmt.where(EventPublication.resubmissions < limit)
        if seen:
            stmt = stmt.where(EventPublication.id.not_in(seen))
        async with self._sessions() as session:
            if not dry_run and session.bind is not None and session.bind.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=EventPublication)
            rows = (await session.execute(stmt)).all()
            now, done = utcnow(), []
            try:
                for publication, row in rows:
                    seen.add(publication.id)
                    age = (now - (publication.sent_at or now)).total_seconds()
                    if dry_run:
                        done.append(Resubmission(row.id, publication.task, publication.status, age,
                                                 publication.resubmissions + 1))
                        continue
                    done.append(await self._resend(publication, row, age))
            finally:  # a broker failure midway keeps the marks of what was sent
                if dry_run:
                    await session.rollback()
                else:
                    await session.commit()
        return done

    async def _resend(self, publication: EventPublication, row: OutboxMessage, age: float) -> Resubmission:
        before = publication.status
        try:
            await self._sender.resend(row, publication.task)
        except KeyError as exc:  # no enabled module runs the task: retrying cannot help
            publication.status, publication.failed_at = FAILED, utcnow()
            publication.last_error = publications.error_text(f"unroutable: no task {exc}")
            logger.error("outbox: publication {} -> {} cannot be resubmitted: {}", row.id,
                         publication.task, publication.last_error)
            return Resubmission(row.id, publication.task, before, age, publication.resubmissions,
                                publication.last_error)
        # The row is locked (PostgreSQL) or the database is (SQLite): no job completed it meanwhile.
        publication.status, publication.resubmitted_at = RESUBMITTED, utcnow()
        publication.resubmissions += 1
        if self._metrics is not None:
            self._metrics.event_resubmitted(publication.task)
        logger.warning("outbox: resubmitted message {} to {} ({} after it was sent, {}; resubmission {})",
                       row.id, publication.task, f"{age:.0f} s", before, publication.resubmissions)
        return Resubmission(row.id, publication.task, before, age, publication.resubmissions)

    async def purge(self, retention_seconds: float) -> int:
        """Delete completed publications completed more than ``retention_seconds`` ago; how many."""
        cutoff = utcnow() - timedelta(seconds=retention_seconds)
        async with self._sessions() as session:
            result = cast("CursorResult[Any]", await session.execute(  # a DML result has rowcount
                delete(EventPublication).where(EventPublication.status == COMPLETED,
                                               EventPublication.completed_at < cutoff)))
            await session.commit()
        return int(result.rowcount)


# --- the report of `atrium outbox status` ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incomplete:
    message_id: uuid.UUID
    task: str
    status: str
    age_seconds: float  # since it was first sent (or failed, when its job ran before the relay's mark)
    resubmissions: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Status:
    by_status: dict[str, int]
    by_task: dict[str, dict[str, int]]
    oldest_incomplete_seconds: float | None  # None: nothing incomplete
    incomplete: list[Incomplete]  # older than asked, oldest first, at most ``shown``
    incomplete_total: int  # how many are older than asked, shown or not

    def as_json(self) -> dict[str, Any]:
        return {
            "by_status": self.by_status, "by_task": self.by_task,
            "oldest_incomplete_seconds": self.oldest_incomplete_seconds,
            "incomplete_total": self.incomplete_total,
            "incomplete": [{"message_id": str(i.message_id), "task": i.task, "status": i.status,
                            "age_seconds": round(i.age_seconds, 3), "resubmissions": i.resubmissions,
                            "last_error": i.last_error} for i in self.incomplete],
        }


async def status(sessions: async_sessionmaker[AsyncSession], *, older_than: float, shown: int = 50) -> Status:
    """Counts per status and per task, the oldest incomplete publication's age, and the incomplete
    publications first sent more than ``older_than`` seconds ago."""
    now = utcnow()
    before = now - timedelta(seconds=older_than)
    async with sessions() as session:
        counts = await publications.counts(session)
        oldest = await publications.oldest_incomplete(session)
        rows = await publications.incomplete(session, first_sent_before=before, limit=shown)
        total = await publications.count_incomplete(session, first_sent_before=before)
    by_status = dict.fromkeys(publications.STATUSES, 0)
    by_task: dict[str, dict[str, int]] = {}
    for task, state, n in counts:
        by_status[state] = by_status.get(state, 0) + n
        by_task.setdefault(task, {})[state] = n
    return Status(
        by_status, by_task,
        max((now - oldest).total_seconds(), 0.0) if oldest is not None else None,
        [Incomplete(r.message_id, r.task, r.status,
                    max((now - (r.first_sent_at or now)).total_seconds(), 0.0), r.resubmissions, r.last_error)
         for r in rows],
        total,
    )


# --- the worker's periodic job ----------------------------------------------------------------------


@periodic("core.resubmit_publications", every="outbox_resubmit_interval_seconds")
async def resubmit_publications(ctx: PeriodicContext) -> None:
    """Resubmit publications incomplete past ``outbox_resubmit_after_seconds`` (at most
    ``outbox_resubmit_limit`` times each) and purge completed ones past the retention."""
    settings = ctx.container.settings()
    resubmitter = Resubmitter(ctx.sessions, ctx.container.relay(), metrics=ctx.container.outbox_metrics())
    with quiet():  # housekeeping every minute: no trace of its own statements
        done = await resubmitter.resubmit(older_than=settings.outbox_resubmit_after_seconds,
                                          limit=settings.outbox_resubmit_limit)
        purged = await resubmitter.purge(settings.outbox_publication_retention_days * 86_400)
    if done or purged:
        logger.info("outbox: {} publication(s) resubmitted, {} completed one(s) purged", len(done), purged)


# Core's periodic jobs: `atrium worker` runs them beside the modules' own, with the root container.
CORE_PERIODIC = (resubmit_publications,)
