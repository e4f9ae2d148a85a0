"""The event-publication registry: what became of each message the outbox relay sent.

One row per message: an outbox row of kind job is one message (to its task), an event is one
message per subscribed task. The relay writes the row ``published`` in the transaction that marks
the outbox row published; the job marks it ``completed`` in its own transaction (the one holding its
inbox claim), or ``failed`` once its last retry failed; ``core.messaging.resubmit`` sends again what
stayed ``published`` too long (``resubmitted``). docs/redelivery.md, "The publication registry".

The relay sends before it commits, so a fast job can finish before the relay's row exists. Hence
two rules that make the order irrelevant: the job upserts (insert ``completed``, or update an
existing row to ``completed``) and the relay only inserts when no row is there, so it never turns a
completed row back into ``published``; and nothing but a job ever writes ``completed``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, UniqueConstraint, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, new_id, utcnow
from core.db.session import UnitOfWork, insert_or_ignore
from core.observability.tracing import quiet

PUBLISHED, COMPLETED, FAILED, RESUBMITTED = "published", "completed", "failed", "resubmitted"
STATUSES = (PUBLISHED, RESUBMITTED, FAILED, COMPLETED)
INCOMPLETE = (PUBLISHED, RESUBMITTED, FAILED)
ERROR_MAX = 500  # last_error: the exception's type and message, cut


class EventPublication(Base):
    __tablename__ = "event_publications"
    __table_args__ = (
        UniqueConstraint("message_id", "task", name="uq_event_publications_message_task"),
        # The resubmitter's and `atrium outbox status`'s question: what is incomplete, oldest first.
        Index("ix_event_publications_status_published", "status", "published_at"),
        # The purge's: completed rows past the retention.
        Index("ix_event_publications_status_completed", "status", "completed_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    message_id: Mapped[uuid.UUID]  # the outbox row's id: what the message carries as message_id
    task: Mapped[str] = mapped_column(String(200))  # the actor the message was sent to
    status: Mapped[str] = mapped_column(String(16))
    published_at: Mapped[datetime | None] = mapped_column(default=None)  # None: the job came first
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(String(ERROR_MAX), default=None)
    resubmissions: Mapped[int] = mapped_column(default=0)
    resubmitted_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def sent_at(self) -> datetime | None:
        """When the message last left for the broker."""
        return self.resubmitted_at or self.published_at or self.failed_at

    @property
    def first_sent_at(self) -> datetime | None:
        """When the relay sent it (when it failed, if its job ran before the relay's mark)."""
        return self.published_at or self.failed_at


def outbox_id(message_id: str) -> uuid.UUID | None:
    """The outbox row id a job's ``message_id`` names; None for a message that came from elsewhere."""
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return None


def error_text(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text[:ERROR_MAX]


async def record_published(session: AsyncSession, sent: Iterable[tuple[uuid.UUID, str]]) -> None:
    """The relay: one ``published`` row per (outbox id, task) sent, unless the job's row is there."""
    now = utcnow()
    rows = [{"id": new_id(), "message_id": message_id, "task": task, "status": PUBLISHED,
             "published_at": now, "resubmissions": 0} for message_id, task in sent]
    if rows:
        await session.execute(insert_or_ignore(session, EventPublication).values(rows))


def _upsert(session: AsyncSession) -> Any:
    """``INSERT`` with ``ON CONFLICT`` for the session's dialect (PostgreSQL or SQLite)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(EventPublication)


async def mark_completed(session: AsyncSession, message_id: str, task: str) -> None:
    """The job, in its own transaction: this message to ``task`` took effect (now or earlier)."""
    await _finish(session, message_id, task, COMPLETED, completed_at=utcnow())


async def mark_failed(session: AsyncSession, message_id: str, task: str, error: BaseException | str) -> None:
    """The job gave up after its last retry: ``failed``, unless a delivery of it has completed."""
    await _finish(session, message_id, task, FAILED, failed_at=utcnow(), last_error=error_text(error))


async def record_failure(sessions: async_sessionmaker[AsyncSession], message_id: str, task: str,
                         error: BaseException | str) -> None:
    """``mark_failed`` in a transaction of its own (the job's rolled back), without spans: it runs
    after the job's last attempt, outside any trace."""
    with quiet():
        async with UnitOfWork(sessions) as session:
            await mark_failed(session, message_id, task, error)


async def _finish(session: AsyncSession, message_id: str, task: str, status: str, **values: Any) -> None:
    row_id = outbox_id(message_id)
    if row_id is None:  # not sent by the relay (a test's, an operator's): nothing to record
        return
    stmt = _upsert(session).values(id=new_id(), message_id=row_id, task=task, status=status,
                                   resubmissions=0, **values)
    table = EventPublication.__table__
    # A failure never overwrites a completion (an earlier delivery of the message took effect).
    keep = table.c.status != COMPLETED if status == FAILED else None
    changes: dict[str, Any] = {"status": status, **values}
    if status == COMPLETED:  # a duplicate delivery keeps the time of the first completion
        changes["completed_at"] = func.coalesce(table.c.completed_at, stmt.excluded.completed_at)
    update = stmt.on_conflict_do_update(index_elements=[table.c.message_id, table.c.task],
                                        set_=changes, where=keep)
    await session.execute(update)


async def counts(session: AsyncSession) -> list[tuple[str, str, int]]:
    """(task, status, rows) for every pair that has rows."""
    stmt = (select(EventPublication.task, EventPublication.status, func.count())
            .group_by(EventPublication.task, EventPublication.status)
            .order_by(EventPublication.task, EventPublication.status))
    return [(task, status, int(n)) for task, status, n in (await session.execute(stmt)).all()]


def _first_sent() -> Any:
    return func.coalesce(EventPublication.published_at, EventPublication.failed_at)


async def incomplete(session: AsyncSession, *, first_sent_before: datetime, limit: int = 50
                     ) -> list[EventPublication]:
    """Incomplete publications first sent before ``first_sent_before``, oldest first."""
    stmt = (select(EventPublication)
            .where(EventPublication.status.in_(INCOMPLETE), _first_sent() < first_sent_before)
            .order_by(_first_sent(), EventPublication.id).limit(limit))
    return list((await session.scalars(stmt)).all())


async def count_incomplete(session: AsyncSession, *, first_sent_before: datetime) -> int:
    stmt = (select(func.count()).select_from(EventPublication)
            .where(EventPublication.status.in_(INCOMPLETE), _first_sent() < first_sent_before))
    return int(await session.scalar(stmt) or 0)


async def oldest_incomplete(session: AsyncSession) -> datetime | None:
    """When the oldest incomplete publication was first sent (None when none is incomplete)."""
    stmt = select(func.min(_first_sent())).where(EventPublication.status.in_(INCOMPLETE))
    return await session.scalar(stmt)
