"""Jobs on dramatiq: the broker per environment, task declarations, and how a job runs.

Modules declare tasks with ``@task("<module>.<verb>")`` as plain ``async`` functions; nothing is
bound to a broker at import time. ``JobRunner`` declares them as dramatiq actors on the broker
the container chose, and runs each message on an asyncio loop (the API's loop for the
in-process development worker, a dedicated loop thread in ``atrium worker``) inside one
transaction that first records the message in the inbox: a message delivered twice runs once.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
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
from core.observability.context import request_id_var

if TYPE_CHECKING:
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


def redis_broker(url: str, namespace: str, *, heartbeat_timeout: int = 60_000,
                 maintenance_chance: int = 1000, **retry: int) -> dramatiq.Broker:
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url, namespace=namespace, middleware=_middleware(**retry),
                       heartbeat_timeout=heartbeat_timeout, maintenance_chance=maintenance_chance,
                       socket_timeout=5, socket_connect_timeout=2)


def rabbitmq_broker(url: str, **retry: int) -> dramatiq.Broker:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, middleware=_middleware(**retry))


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
            try:
                self.bridge.run(self.execute(t.name, message_id, request_id, payload))
            except (Exception, TimeLimitExceeded) as exc:
                last = self._is_last_attempt(t)
                if self._metrics is not None:
                    self._metrics.failed_attempt(t.name, time.perf_counter() - started, will_retry=not last)
                if t.on_exhausted is not None and last:
                    self.bridge.run(self.give_up(t.name, message_id, request_id, payload, exc))
                raise
            if self._metrics is not None:
                self._metrics.succeeded(t.name, time.perf_counter() - started)

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

    @property
    def queues(self) -> set[str]:
        return {self._queue_prefix + t.module for t in self.tasks.values()}

    def queue_of(self, task_name: str) -> str:
        return self._queue_prefix + self.tasks[task_name].module

    async def execute(self, task_name: str, message_id: str, request_id: str, payload: Any) -> bool:
        """Run one message in one transaction; False when it had already been processed."""
        t = self.tasks[task_name]
        token = request_id_var.set(request_id)
        try:
            value = t.payload.validate_python(payload)
            async with UnitOfWork(self._sessions) as session:
                if not await self._inbox.claim(session, message_id, t.name):
                    logger.info("job {} skipped: message {} already processed", t.name, message_id)
                    return False
                await t.fn(JobContext(self._containers[t.module], session, message_id, request_id), value)
            logger.info("job {} done (message {})", t.name, message_id)
            return True
        finally:
            request_id_var.reset(token)


    async def give_up(self, task_name: str, message_id: str, request_id: str, payload: Any,
                      error: BaseException) -> bool:
        """Run the task's ``on_exhausted`` once per message; False when it had already run."""
        t = self.tasks[task_name]
        assert t.on_exhausted is not None
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
        except Exception as exc:  # the message is dead-lettered either way; keep the original error
            logger.exception("job {}: on_exhausted failed (message {}): {}", t.name, message_id, exc)
            return False
        finally:
            request_id_var.reset(token)


def dump_payload(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
