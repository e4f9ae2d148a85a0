"""Jobs on dramatiq: the broker per environment, task declarations, and how a job runs.

Modules declare tasks with ``@task("<module>.<verb>")`` as plain ``async`` functions; nothing is
bound to a broker at import time. ``JobRunner`` declares them as dramatiq actors on the broker
the container chose, and runs each message on an asyncio loop (the API's loop for the
in-process development worker, a dedicated loop thread in ``atrium worker``) inside one
transaction that first records the message in the inbox: a message delivered twice runs once.

With tracing on, a message carries the W3C context it was sent with in its ``trace_context``
option (see ``core.messaging.outbox``), and each attempt of the job is a CONSUMER span
``<task> process``, a child of that context, linked to the span that sent the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.middleware.time_limit import TimeLimitExceeded
from loguru import logger
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.session import UnitOfWork
from core.messaging import publications
from core.observability.context import request_id_var
from core.observability.tracing import enabled as tracing_enabled
from core.observability.tracing import module_scope, unsampled_scope

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from core.observability.metrics import JobMetrics

TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")


@dataclass(slots=True)
class JobContext:
    """What a task body gets besides its payload."""

    container: Any  # the module's own sub-container
    session: AsyncSession  # the job's transaction; committed by the runner
    message_id: str
    request_id: str


TaskFn = Callable[[JobContext, Any], Awaitable[None]]
# Called once, in its own transaction, when the last retry of a message has failed (the message
# then goes to the dead-letter queue): the place to record the failure where users can see it.
ExhaustedFn = Callable[[JobContext, Any, BaseException], Awaitable[None]]


@dataclass(frozen=True)
class Task:
    name: str
    fn: TaskFn
    payload: TypeAdapter[Any] = field(compare=False)
    max_retries: int | None = None
    time_limit_ms: int | None = None
    on_exhausted: ExhaustedFn | None = field(default=None, compare=False)

    @property
    def module(self) -> str:
        return self.name.split(".", 1)[0]


def task(name: str, *, max_retries: int | None = None, time_limit_ms: int | None = None,
         on_exhausted: ExhaustedFn | None = None) -> Callable[[TaskFn], Task]:
    """Declare a job; its payload type is the annotation of the function's second parameter."""
    if not TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must be '<module>.<verb>' in snake_case")

    def declare(fn: TaskFn) -> Task:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        if len(params) != 2 or not inspect.iscoroutinefunction(fn):
            raise TypeError(f"task {name!r} must be 'async def fn(ctx: JobContext, payload: T)'")
        annotation = params[1].annotation
        adapter = TypeAdapter(Any if annotation is inspect.Parameter.empty else annotation)
        return Task(name, fn, adapter, max_retries, time_limit_ms, on_exhausted)

    return declare


# --- brokers -------------------------------------------------------------------------------

def _middleware(max_retries: int, min_backoff_ms: int, max_backoff_ms: int, time_limit_ms: int) -> list[Any]:
    return [
        AgeLimit(),
        TimeLimit(time_limit=time_limit_ms),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        CurrentMessage(),
        Retries(max_retries=max_retries, min_backoff=min_backoff_ms, max_backoff=max_backoff_ms),
    ]


def stub_broker(**retry: int) -> dramatiq.Broker:
    return StubBroker(middleware=_middleware(**retry))


def redis_broker(url: str, namespace: str, *, heartbeat_timeout: int = 10_000,
                 maintenance_chance: int = 1_000_000, **retry: int) -> dramatiq.Broker:
    """A Redis broker that gives a dead worker's messages back within about ``heartbeat_timeout``
    plus one second (docs/redelivery.md): every command refreshes the worker's heartbeat, and with
    ``maintenance_chance`` at 1,000,000 every fetch also requeues what dead workers held."""
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url, namespace=namespace, middleware=_middleware(**retry),
                       heartbeat_timeout=heartbeat_timeout, maintenance_chance=maintenance_chance,
                       socket_timeout=5, socket_connect_timeout=2)


def rabbitmq_broker(url: str, **retry: int) -> dramatiq.Broker:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, middleware=_middleware(**retry))


class Redeliveries(Middleware):
    """Counts the messages a worker is given again after an earlier delivery was never acknowledged
    (``atrium_jobs_redelivered_total``; docs/redelivery.md).

    RabbitMQ flags such a delivery itself (``redelivered``: the message had been handed to a
    consumer whose connection closed before the ack, running or prefetched). Redis has no flag: a key
    ``<namespace>:__started__.<redis_message_id>`` is set when a worker starts the message and deleted
    when it is done, so finding it already there means a worker died while running that message.
    """

    MARKER_TTL_MS = 7 * 86_400_000  # as long as dramatiq keeps a dead letter

    def __init__(self, metrics: JobMetrics) -> None:
        self._metrics = metrics

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if getattr(message, "redelivered", False) or self._started_before(broker, message):
            self._metrics.redelivered(message.actor_name)

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        self._forget(broker, message)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._forget(broker, message)

    @staticmethod
    def _marker(broker: dramatiq.Broker, message: Any) -> tuple[Any, str] | None:
        client, redis_id = getattr(broker, "client", None), message.options.get("redis_message_id")
        if client is None or redis_id is None:
            return None
        return client, f"{broker.namespace}:__started__.{redis_id}"  # type: ignore[attr-defined]

    def _started_before(self, broker: dramatiq.Broker, message: Any) -> bool:
        marker = self._marker(broker, message)
        if marker is None:
            return False
        client, key = marker
        try:
            return client.set(key, 1, nx=True, px=self.MARKER_TTL_MS) is None
        except Exception as exc:  # a metric never fails a job
            logger.warning("redelivery marker not set ({}): {}", type(exc).__name__, exc)
            return False

    def _forget(self, broker: dramatiq.Broker, message: Any) -> None:
        marker = self._marker(broker, message)
        if marker is not None:
            with contextlib.suppress(Exception):
                marker[0].delete(marker[1])


def ping_broker(broker: dramatiq.Broker) -> None:
    """Blocking reachability check (run it in a thread)."""
    client = getattr(broker, "client", None)
    if client is not None:  # Redis
        client.ping()
    elif hasattr(broker, "parameters"):  # RabbitMQ: a fresh connection, not the cached one
        import pika

        pika.BlockingConnection(broker.parameters).close()


class BrokerSender:
    """Sends a message without blocking the event loop (network brokers enqueue synchronously)."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self._broker = broker

    async def __call__(self, message: dramatiq.Message[Any]) -> None:
        if isinstance(self._broker, StubBroker):
            self._broker.enqueue(message)
        else:
            await asyncio.to_thread(self._broker.enqueue, message)


# --- the trace context, from the request through the outbox into the job -------------------------

# The message option that carries the W3C context a job continues: {"traceparent": .., "tracestate": ..}.
# An option rather than an argument of the actor: messages queued by an earlier version (without it)
# still run, and a worker of an earlier version ignores it.
TRACE_OPTION = "trace_context"
# The message option naming the integration event a message carries (absent for a plain job): what
# ``atrium_events_consumed_total`` counts.
EVENT_OPTION = "event"
TRACESTATE_MAX = 512  # the outbox column; W3C asks every propagator to carry at least this much


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the broker's message says besides the job's arguments (read only with tracing on)."""

    trace_context: Mapping[str, str] | None = None
    attempt: int = 1  # 1 + the retries dramatiq made before this one
    broker_message_id: str | None = None


_tracing: tuple[Tracer, TraceContextTextMapPropagator] | None = None


def tracer_and_propagator() -> tuple[Tracer, TraceContextTextMapPropagator]:
    """The messaging tracer and the W3C propagator, imported on first use: tracing off costs nothing.

    Always W3C trace context, whatever OTEL_PROPAGATORS says: it is what the outbox columns hold.
    """
    global _tracing
    if _tracing is None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _tracing = trace.get_tracer("atrium.messaging"), TraceContextTextMapPropagator()
    return _tracing


def current_trace_context() -> tuple[str | None, str | None]:
    """The traceparent and tracestate of the current span; (None, None) with tracing off or no span."""
    if not tracing_enabled():
        return None, None
    carrier: dict[str, str] = {}
    tracer_and_propagator()[1].inject(carrier)  # injects nothing when no span is current
    return carrier.get("traceparent"), fit_tracestate(carrier.get("tracestate"))


def fit_tracestate(value: str | None) -> str | None:
    """``value`` cut to ``TRACESTATE_MAX`` characters by dropping whole entries from its end (W3C's rule)."""
    if value is None or len(value) <= TRACESTATE_MAX:
        return value
    entries = value.split(",")
    while entries and len(",".join(entries)) > TRACESTATE_MAX:
        entries.pop()
    return ",".join(entries) or None


@contextlib.contextmanager
def messaging_span(name: str, kind_name: Literal["PRODUCER", "CONSUMER"], module: str,
                   carrier: Mapping[str, str] | None, attributes: dict[str, str | int | bool], *,
                   link: bool = False) -> Iterator[Span]:
    """A span of ``kind_name`` (PRODUCER or CONSUMER) whose parent is the context in ``carrier``.

    No carrier (a row written with tracing off, a message of an earlier version): a new trace, never
    the ambient context. ``link``: also link the span to that context (the span that sent a message).
    An exception, even a cancellation (a job's time limit), is recorded and marks the span an ERROR.
    The span and those started inside (SQL, HTTP, SMTP) carry ``atrium.module=<module>``. A span
    that does not record (its context says "not sampled") runs with the instrumentations suppressed.
    """
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode, get_current_span

    tracer, propagator = tracer_and_propagator()
    parent = propagator.extract(carrier or {})
    sender = get_current_span(parent).get_span_context()
    links = [Link(sender)] if link and sender.is_valid else None
    with module_scope(module), tracer.start_as_current_span(
        name, context=parent, kind=SpanKind[kind_name], links=links, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        if not span.is_recording():  # an unsampled trace: its SQL, HTTP and Redis calls make no span
            with unsampled_scope():
                yield span
            return
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise


# --- running jobs --------------------------------------------------------------------------

class LoopBridge:
    """Runs coroutines on one asyncio loop from dramatiq's worker threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LoopBridge has no loop: call bind() or start_thread() first")
        return self._loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start_thread(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="atrium-jobs-loop", daemon=True)
        self._thread.start()
        self._loop = loop
        return loop

    def stop_thread(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def run(self, coro: Awaitable[Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. dramatiq's TimeLimit interrupting this thread
            raise


class JobRunner:
    """Declares every enabled task as an actor and executes messages idempotently."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        sessions: async_sessionmaker[AsyncSession],
        inbox: Any,
        bridge: LoopBridge,
        containers: Mapping[str, Any],
        tasks: list[Task],
        queue_prefix: str = "",
        metrics: JobMetrics | None = None,
    ) -> None:
        self.broker = broker
        self._sessions = sessions
        self._inbox = inbox
        self.bridge = bridge
        self._containers = containers
        self.tasks = {t.name: t for t in tasks}
        retries = next((m for m in broker.middleware if isinstance(m, Retries)), None)
        self._default_max_retries = retries.max_retries if retries is not None else 0
        # One queue per module, prefixed so that several deployments (or test runs) can share
        # one RabbitMQ vhost without consuming each other's messages.
        self._queue_prefix = queue_prefix
        self._metrics = metrics  # processed / failed / retried / duration per task
        if metrics is not None:
            broker.add_middleware(Redeliveries(metrics))
        for t in tasks:
            self._declare(t)

    def _declare(self, t: Task) -> None:
        options: dict[str, Any] = {}
        if t.max_retries is not None:
            options["max_retries"] = t.max_retries
        if t.time_limit_ms is not None:
            options["time_limit"] = t.time_limit_ms

        def run_message(message_id: str, request_id: str, payload: Any) -> None:
            started = time.perf_counter()
            delivery = self._delivery() if tracing_enabled() else None
            try:
                ran = self.bridge.run(self.execute(t.name, message_id, request_id, payload, delivery))
            except (Exception, TimeLimitExceeded) as exc:
                last = self._is_last_attempt(t)
                if self._metrics is not None:
                    self._metrics.failed_attempt(t.name, time.perf_counter() - started, will_retry=not last)
                if last:
                    self.bridge.run(self.record_failure(t.name, message_id, exc))
                if t.on_exhausted is not None and last:
                    self.bridge.run(self.give_up(t.name, message_id, request_id, payload, exc, delivery))
                raise
            if self._metrics is not None:
                self._metrics.succeeded(t.name, time.perf_counter() - started)
                if ran:  # took effect: a redelivered duplicate, skipped by the inbox, is not counted again
                    self._count_event(t)

        run_message.__name__ = t.name.replace(".", "_")
        dramatiq.Actor(run_message, broker=self.broker, actor_name=t.name, queue_name=self.queue_of(t.name),
                       priority=0, options=options)

    def _is_last_attempt(self, t: Task) -> bool:
        """True when dramatiq's Retries will dead-letter the current message after this failure."""
        message = CurrentMessage.get_current_message()
        if message is None:
            return False
        retries = message.options.get("retries", 0)  # retries before this attempt
        limit = message.options.get("max_retries", t.max_retries if t.max_retries is not None
                                    else self._default_max_retries)
        return limit is not None and retries >= limit

    def _count_event(self, t: Task) -> None:
        assert self._metrics is not None
        message = CurrentMessage.get_current_message()
        if message is not None and message.options.get(EVENT_OPTION):
            self._metrics.event_consumed(t.module, t.name)

    @staticmethod
    def _delivery() -> Delivery | None:
        message = CurrentMessage.get_current_message()
        if message is None:
            return None
        carrier = message.options.get(TRACE_OPTION)
        return Delivery(
            trace_context=carrier if isinstance(carrier, dict) else None,
            attempt=int(message.options.get("retries", 0)) + 1,
            broker_message_id=message.message_id,
        )

    @property
    def queues(self) -> set[str]:
        return {self._queue_prefix + t.module for t in self.tasks.values()}

    def queue_of(self, task_name: str) -> str:
        return self._queue_prefix + self.tasks[task_name].module

    async def execute(self, task_name: str, message_id: str, request_id: str, payload: Any,
                      delivery: Delivery | None = None) -> bool:
        """Run one message in one transaction; False when it had already been processed.

        With tracing on, the attempt is the CONSUMER span ``<task> process`` (see ``messaging_span``).
        """
        t = self.tasks[task_name]
        if not tracing_enabled():
            return await self._execute(t, message_id, request_id, payload)
        with self._span(t, "process", message_id, request_id, delivery) as span:
            ran = await self._execute(t, message_id, request_id, payload)
            if not ran:
                span.set_attribute("atrium.job.duplicate", True)
            return ran

    async def _execute(self, t: Task, message_id: str, request_id: str, payload: Any) -> bool:
        token = request_id_var.set(request_id)
        try:
            value = t.payload.validate_python(payload)
            async with UnitOfWork(self._sessions) as session:
                if not await self._inbox.claim(session, message_id, t.name):
                    # A duplicate (a redelivery, a resubmission): the registry says done all the same.
                    await publications.mark_completed(session, message_id, t.name)
                    logger.info("job {} skipped: message {} already processed", t.name, message_id)
                    return False
                await t.fn(JobContext(self._containers[t.module], session, message_id, request_id), value)
                # Last, so the registry's row is locked (PostgreSQL) only for the commit.
                await publications.mark_completed(session, message_id, t.name)
            logger.info("job {} done (message {})", t.name, message_id)
            return True
        finally:
            request_id_var.reset(token)

    async def record_failure(self, task_name: str, message_id: str, error: BaseException) -> None:
        """Mark the message's publication ``failed`` (its last retry failed), in a transaction of its own
        (the job's rolled back); a failure to record it is logged, never raised over the job's error."""
        try:
            await publications.record_failure(self._sessions, message_id, task_name, error)
        except Exception as exc:
            logger.warning("job {}: the publication of message {} was not marked failed: {}",
                           task_name, message_id, exc)

    async def give_up(self, task_name: str, message_id: str, request_id: str, payload: Any,
                      error: BaseException, delivery: Delivery | None = None) -> bool:
        """Run the task's ``on_exhausted`` once per message; False when it had already run.

        With tracing on, in a CONSUMER span ``<task> give_up`` beside the attempts' spans.
        """
        t = self.tasks[task_name]
        assert t.on_exhausted is not None
        try:
            if not tracing_enabled():
                return await self._give_up(t, message_id, request_id, payload, error)
            with self._span(t, "give_up", message_id, request_id, delivery):
                return await self._give_up(t, message_id, request_id, payload, error)
        except Exception as exc:  # the message is dead-lettered either way; keep the original error
            logger.exception("job {}: on_exhausted failed (message {}): {}", t.name, message_id, exc)
            return False

    async def _give_up(self, t: Task, message_id: str, request_id: str, payload: Any,
                       error: BaseException) -> bool:
        assert t.on_exhausted is not None  # for mypy: give_up checked it
        token = request_id_var.set(request_id)
        try:
            value = t.payload.validate_python(payload)
            async with UnitOfWork(self._sessions) as session:
                if not await self._inbox.claim(session, message_id, f"{t.name}:exhausted"):
                    return False
                await t.on_exhausted(
                    JobContext(self._containers[t.module], session, message_id, request_id), value, error
                )
            logger.error("job {} gave up after its last retry (message {}): {}: {}",
                         t.name, message_id, type(error).__name__, error)
            return True
        finally:
            request_id_var.reset(token)

    def _span(self, t: Task, operation: str, message_id: str, request_id: str,
              delivery: Delivery | None) -> contextlib.AbstractContextManager[Span]:
        """The CONSUMER span of one attempt: a child of the context the message was sent with, and
        linked to it (the relay's PRODUCER span), so each retry is its own span of the same trace."""
        delivery = delivery or Delivery()
        attributes: dict[str, str | int | bool] = {
            "messaging.system": "dramatiq",
            "messaging.operation.type": "process",
            "messaging.operation.name": operation,
            "messaging.destination.name": self.queue_of(t.name),
            "atrium.task": t.name,
            "atrium.outbox.message_id": message_id,
            "atrium.request_id": request_id,
            "atrium.job.attempt": delivery.attempt,
        }
        if delivery.broker_message_id is not None:
            attributes["messaging.message.id"] = delivery.broker_message_id
        return messaging_span(f"{t.name} {operation}", "CONSUMER", t.module, delivery.trace_context,
                              attributes, link=True)


def dump_payload(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
