"""The transactional outbox and inbox.

A change and the events/jobs it causes are written in one transaction (``Outbox.publish`` /
``Outbox.enqueue`` add rows to the caller's session). After commit the relay is woken; it sends
unpublished rows to the broker and marks them. If the broker is down the rows wait and the
relay retries, so nothing committed is lost. Consumers record each message id in the inbox in
the same transaction as their effect, so a message delivered twice takes effect once.

Tracing (on by settings): a row also keeps the W3C context of the span that wrote it (the request,
or the job whose transaction wrote it). The relay sends each message in a PRODUCER span
``<name> publish``, a child of that stored context, and puts the producer's own context in the
message (option ``trace_context``); the job continues the trace from there (``core.messaging.queue``).
So a trace goes request -> relay -> job -> the job's event -> relay -> next job, whenever the relay
gets to it: with the broker down for an hour, the trace resumes when the row leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from dramatiq import Message
from loguru import logger
from sqlalchemy import JSON, CursorResult, Index, String, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, new_id, utcnow
from core.db.session import insert_or_ignore, on_commit
from core.messaging.events import IntegrationEvent
from core.messaging.publications import record_published
from core.messaging.queue import (
    EVENT_OPTION,
    TRACE_OPTION,
    current_trace_context,
    dump_payload,
    messaging_span,
    tracer_and_propagator,
)
from core.observability.context import request_id_var
from core.observability.tracing import enabled as tracing_enabled
from core.observability.tracing import quiet

if TYPE_CHECKING:
    from core.observability.metrics import OutboxMetrics

EVENT, JOB = "event", "job"


class OutboxMessage(Base):
    __tablename__ = "outbox_messages"
    __table_args__ = (Index("ix_outbox_messages_unpublished", "published_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_id: Mapped[str] = mapped_column(String(128), default="-")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # Set when a row can never be delivered (no such task): kept for inspection, never retried,
    # so it cannot block the rows behind it.
    parked_at: Mapped[datetime | None] = mapped_column(default=None)
    # The W3C context of the span that wrote the row (None with tracing off): where the trace resumes.
    traceparent: Mapped[str | None] = mapped_column(String(55), default=None)
    tracestate: Mapped[str | None] = mapped_column(String(512), default=None)

    def trace_context(self) -> dict[str, str]:
        """The stored context as a W3C carrier (empty when none was stored)."""
        carrier = {"traceparent": self.traceparent} if self.traceparent else {}
        if carrier and self.tracestate:
            carrier["tracestate"] = self.tracestate
        return carrier


class InboxMessage(Base):
    __tablename__ = "inbox_messages"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    consumer: Mapped[str] = mapped_column(String(200), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Outbox:
    """Writes events and jobs into the caller's transaction."""

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._notify = notify

    def publish(self, session: AsyncSession, event: IntegrationEvent) -> None:
        self._add(session, EVENT, event.name, event.model_dump(mode="json"), event.event_id)

    def enqueue(self, session: AsyncSession, task_name: str, payload: Any) -> None:
        self._add(session, JOB, task_name, dump_payload(payload), new_id())

    def _add(self, session: AsyncSession, kind: str, name: str, payload: Any, row_id: uuid.UUID) -> None:
        traceparent, tracestate = current_trace_context()
        session.add(OutboxMessage(id=row_id, kind=kind, name=name, payload=payload,
                                  request_id=request_id_var.get(), traceparent=traceparent,
                                  tracestate=tracestate))
        if self._notify is not None:
            on_commit(session, self._notify)


class Inbox:
    """Claims (message, consumer) pairs; a second claim of the same pair is refused."""

    async def claim(self, session: AsyncSession, message_id: str, consumer: str) -> bool:
        stmt = insert_or_ignore(session, InboxMessage).values(
            message_id=message_id, consumer=consumer, processed_at=utcnow()
        )
        result = cast("CursorResult[Any]", await session.execute(stmt))  # a DML result has rowcount
        return bool(result.rowcount)


class OutboxRelay:
    """Moves committed outbox rows to the broker; safe to run in several processes at once."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        send: Callable[[Message[Any]], Any],
        routes: Mapping[str, Sequence[str]],
        queue_of: Callable[[str], str],
        batch_size: int = 100,
        poll_interval: float = 1.0,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self._metrics = metrics  # lag after each pass, rows published
        self._sessions = sessions
        self._send = send
        self._routes = routes
        self._queue_of = queue_of
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Wake the relay now (called after a commit that wrote outbox rows); thread-safe."""
        if self._wake is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # One last pass so events committed just before shutdown leave now, not at next boot.
        try:
            await self.relay_once()
        except Exception as exc:
            logger.warning("outbox: final relay failed, rows stay for the next run: {}", exc)

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = self._poll_interval
        while True:
            try:
                while await self.relay_once() == self._batch_size:
                    pass
                backoff = self._poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database down: keep the rows, retry later
                backoff = min(backoff * 2, 30.0)
                logger.warning("outbox: relay failed ({}); retrying in {:.1f}s", exc, backoff)
            if self._metrics is not None:
                await self._measure_lag(self._metrics)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            self._wake.clear()

    async def relay_once(self) -> int:
        """Send one batch of unpublished rows; returns how many rows were handled."""
        # No spans for the relay's own statements and broker commands (each poll would be a trace of
        # its own); what it sends is still traced: one PRODUCER span per message (_deliver).
        with quiet():
            return await self._relay_batch()

    async def _relay_batch(self) -> int:
        async with self._sessions() as session:
            stmt = (
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None), OutboxMessage.parked_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(self._batch_size)
            )
            if session.bind is not None and session.bind.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            rows = (await session.scalars(stmt)).all()
            if not rows:
                await session.rollback()
                return 0
            sent: list[str] = []  # the names of the events among the rows sent (for the per-module count)
            registry: list[tuple[uuid.UUID, str]] = []  # (row, task) of each message of the rows marked
            published = 0
            for row in rows:
                try:
                    messages = self._messages(row)
                except Exception as exc:  # unroutable: retrying cannot help
                    row.attempts += 1
                    row.last_error = f"unroutable: {type(exc).__name__}: {exc}"[:2000]
                    row.parked_at = utcnow()
                    logger.error("outbox: parked {} {} ({}): {}", row.kind, row.name, row.id, row.last_error)
                    continue
                try:
                    for message in messages:
                        await self._deliver(row, message)
                except Exception as exc:  # broker trouble: stop here, keep the row, retry later
                    row.attempts += 1
                    row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                    await record_published(session, registry)
                    await session.commit()
                    self._count_published(published, sent)
                    raise
                row.published_at = utcnow()
                registry.extend((row.id, message.actor_name) for message in messages)
                published += 1
                if row.kind == EVENT:
                    sent.append(row.name)
            # One statement at the end: on SQLite the write lock is then held only for the commit.
            await record_published(session, registry)
            await session.commit()
            self._count_published(published, sent)
            return len(rows)

    def _count_published(self, rows: int, events: list[str]) -> None:
        """Counted once committed: a row whose mark was lost is sent (and counted) again next pass."""
        if self._metrics is None:
            return
        if rows:
            self._metrics.published.inc(rows)
        for name in events:  # the emitting module: the event name's prefix
            self._metrics.event_published(name.split(".", 1)[0], name)

    async def oldest_waiting_age(self) -> float:
        """Seconds since the oldest unpublished, unparked row was written (0 when none waits)."""
        async with self._sessions() as session:
            oldest = await session.scalar(
                select(func.min(OutboxMessage.created_at))
                .where(OutboxMessage.published_at.is_(None), OutboxMessage.parked_at.is_(None))
            )
        return max((utcnow() - oldest).total_seconds(), 0.0) if oldest is not None else 0.0

    async def _measure_lag(self, metrics: OutboxMetrics) -> None:
        try:
            with quiet():
                metrics.lag.set(await self.oldest_waiting_age())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is down: the relay already says so; keep the last value
            logger.debug("outbox: measuring the lag failed: {}", exc)

    async def _deliver(self, row: OutboxMessage, message: Message[Any]) -> None:
        if not tracing_enabled():
            await self._send_now(message)  # with the row's stored context, if any, passed on as it is
            return
        attributes: dict[str, str | int | bool] = {
            "messaging.system": "dramatiq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": message.queue_name,
            "messaging.message.id": message.message_id,
            "atrium.task": message.actor_name,
            "atrium.outbox.kind": row.kind,
            "atrium.outbox.message_id": str(row.id),
            "atrium.outbox.attempt": row.attempts + 1,
            "atrium.request_id": row.request_id,
        }
        # The module that wrote the row: the event's publisher, or the module of the job.
        module = row.name.split(".", 1)[0]
        with messaging_span(f"{row.name} publish", "PRODUCER", module, row.trace_context(), attributes):
            carrier: dict[str, str] = {}
            tracer_and_propagator()[1].inject(carrier)  # the job continues from this span
            message.options[TRACE_OPTION] = carrier
            await self._send_now(message)

    async def _send_now(self, message: Message[Any]) -> None:
        result = self._send(message)
        if asyncio.iscoroutine(result):
            await result

    async def resend(self, row: OutboxMessage, task: str) -> None:
        """Send ``row``'s message to ``task`` again, as the relay first sent it (same message id,
        payload and request id; the trace context as stored): the registry's resubmission."""
        await self._send_now(self.message(row, task))

    def _messages(self, row: OutboxMessage) -> list[Message[Any]]:
        targets = [row.name] if row.kind == JOB else list(self._routes.get(row.name, ()))
        return [self.message(row, target) for target in targets]

    def message(self, row: OutboxMessage, target: str) -> Message[Any]:
        """``row``'s message to the task ``target``; ``KeyError`` when no enabled module runs it."""
        options: dict[str, Any] = {EVENT_OPTION: row.name} if row.kind == EVENT else {}
        carrier = row.trace_context()
        if carrier:  # passed on as stored; with tracing on, _deliver puts its PRODUCER span's instead
            options[TRACE_OPTION] = carrier
        return Message(
            queue_name=self._queue_of(target),
            actor_name=target,
            args=(),
            kwargs={"message_id": str(row.id), "request_id": row.request_id, "payload": row.payload},
            options=options,
        )
