"""One jobs contract for every broker: the StubBroker, Redis and RabbitMQ.

A real ``dramatiq.Worker`` consumes from the broker and ``JobRunner`` runs each message on this
test's event loop (``LoopBridge``) in one transaction on a migrated SQLite database. The tasks
below belong to a test-only module "contract"; its "container" is a ``Probe`` that records every
run. Effects are awaited by polling with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.common import dq_name, xq_name
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.messaging.events import IntegrationEvent
from core.messaging.outbox import Inbox, InboxMessage, Outbox, OutboxMessage, OutboxRelay
from core.messaging.queue import (
    BrokerSender,
    JobContext,
    JobRunner,
    LoopBridge,
    ping_broker,
    rabbitmq_broker,
    redis_broker,
    stub_broker,
    task,
)
from core.observability.context import request_id_var
from modules.users.models import UserRow
from tests.support.db import migrated
from tests.support.services import RABBITMQ_URL, REDIS_URL, require

RETRY = {"max_retries": 2, "min_backoff_ms": 10, "max_backoff_ms": 50, "time_limit_ms": 10_000}
DEADLINE = 10.0


# --- the "contract" module's tasks ---------------------------------------------------------------


class Note(BaseModel):
    key: str
    n: int = 0


class Happened(IntegrationEvent):
    name = "contract.Happened"

    key: str


@dataclass(frozen=True)
class Run:
    task: str
    payload: Any
    message_id: str
    request_id: str
    request_id_in_context: str


@dataclass
class Probe:
    """What the tasks get as ``ctx.container``: a record of every completed run and attempt."""

    runs: list[Run] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)

    def record(self, ctx: JobContext, task_name: str, payload: Any) -> None:
        self.runs.append(Run(task_name, payload, ctx.message_id, ctx.request_id, request_id_var.get()))

    def attempt(self, key: str) -> int:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    def of(self, key: str) -> list[Run]:
        return [r for r in self.runs if getattr(r.payload, "key", None) == key]


def _user(key: str) -> UserRow:
    return UserRow(email=f"{key}@contract.test", password_hash="-", full_name=key, age=30)


@task("contract.record")
async def record(ctx: JobContext, note: Note) -> None:
    """Writes a row (unique per key, so a second effect would fail) and records the run."""
    ctx.session.add(_user(note.key))
    await ctx.session.flush()
    ctx.container.record(ctx, "contract.record", note)


@task("contract.flaky")
async def flaky(ctx: JobContext, note: Note) -> None:
    """Fails its first attempt after writing; the retry must be the only effect."""
    attempt = ctx.container.attempt(note.key)
    ctx.session.add(_user(note.key))
    await ctx.session.flush()
    if attempt == 1:
        raise RuntimeError("first attempt fails")
    ctx.container.record(ctx, "contract.flaky", note)


@task("contract.doomed")
async def doomed(ctx: JobContext, note: Note) -> None:
    ctx.container.attempt(note.key)
    ctx.session.add(_user(note.key))
    await ctx.session.flush()
    raise RuntimeError("always fails")


@task("contract.on_happened")
async def on_happened(ctx: JobContext, event: Happened) -> None:
    ctx.container.record(ctx, "contract.on_happened", event)


@task("contract.audit_happened")
async def audit_happened(ctx: JobContext, event: Happened) -> None:
    ctx.container.record(ctx, "contract.audit_happened", event)


TASKS = [record, flaky, doomed, on_happened, audit_happened]
ROUTES = {"contract.Happened": ["contract.on_happened", "contract.audit_happened"]}


# --- harness -------------------------------------------------------------------------------------


class Processed(dramatiq.Middleware):
    """Outcome of every delivery the worker finished: None (ok) or the exception's class name."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str | None]] = []

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = None if exception is None else type(exception).__name__
        self.outcomes.append((message.kwargs.get("message_id", ""), outcome))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.outcomes.append((message.kwargs.get("message_id", ""), "skipped"))

    def of(self, message_id: str) -> list[str | None]:
        return [outcome for mid, outcome in list(self.outcomes) if mid == message_id]


async def eventually(check: Callable[[], bool], what: str, within: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def _cleanup(broker: dramatiq.Broker) -> None:
    """Leave nothing behind on the shared servers (blocking; run in a thread)."""
    kind = type(broker).__name__
    if kind == "RedisBroker":
        broker.flush_all()
        client = broker.client  # type: ignore[attr-defined]
        keys = list(client.scan_iter(match=f"{broker.namespace}:*", count=500))  # type: ignore[attr-defined]
        if keys:
            client.delete(*keys)
        client.close()
        client.connection_pool.disconnect()
    elif kind == "RabbitmqBroker":
        import pika.exceptions

        broker.flush_all()
        for queue in broker.get_declared_queues():
            for name in (queue, dq_name(queue), xq_name(queue)):
                try:
                    broker.channel.queue_delete(name, if_unused=True)  # type: ignore[attr-defined]
                except pika.exceptions.AMQPError:
                    del broker.channel  # type: ignore[attr-defined]  # a refused delete closes the channel
    broker.close()


@pytest.fixture(params=["stub", "redis", "rabbitmq"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[dramatiq.Broker]:
    kind: str = request.param
    if kind == "stub":
        made = stub_broker(**RETRY)
    else:
        require(kind)
        made = (redis_broker(REDIS_URL, namespace=f"atrium-contract-{uuid.uuid4().hex}", **RETRY)
                if kind == "redis" else rabbitmq_broker(RABBITMQ_URL, **RETRY))
    try:
        yield made
    finally:
        await asyncio.to_thread(_cleanup, made)


@pytest.fixture(scope="module")
async def jobs_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("broker-contract") / "jobs.db"
    return await migrated(f"sqlite+aiosqlite:///{path}")


@dataclass
class Harness:
    broker: dramatiq.Broker
    runner: JobRunner
    probe: Probe
    processed: Processed
    sessions: async_sessionmaker[AsyncSession]
    send: BrokerSender

    def message(
        self, actor: str, payload: Any, *, message_id: str | None = None, request_id: str = "-"
    ) -> dramatiq.Message[Any]:
        """A message built the way ``OutboxRelay`` builds them."""
        return dramatiq.Message(
            queue_name=self.runner.queue_of(actor),
            actor_name=actor,
            args=(),
            kwargs={
                "message_id": message_id or str(uuid.uuid4()),
                "request_id": request_id,
                "payload": payload,
            },
            options={},
        )

    async def users(self, key: str) -> list[UserRow]:
        async with self.sessions() as session:
            return list((await session.scalars(select(UserRow).where(UserRow.full_name == key))).all())

    async def inbox(self, message_id: str) -> list[str]:
        async with self.sessions() as session:
            statement = select(InboxMessage.consumer).where(InboxMessage.message_id == message_id)
            return sorted((await session.scalars(statement)).all())


@pytest.fixture
async def harness(broker: dramatiq.Broker, jobs_database: str) -> AsyncIterator[Harness]:
    engine = create_engine(jobs_database)
    sessions = session_factory(engine)
    processed = Processed()
    broker.add_middleware(processed)
    bridge = LoopBridge()
    bridge.bind(asyncio.get_running_loop())
    probe = Probe()
    runner = JobRunner(broker, sessions, Inbox(), bridge, containers={"contract": probe}, tasks=TASKS,
                       queue_prefix=f"t{uuid.uuid4().hex[:8]}.")  # runs sharing a server stay apart
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    await asyncio.to_thread(worker.start)
    try:
        yield Harness(broker, runner, probe, processed, sessions, BrokerSender(broker))
    finally:
        await asyncio.to_thread(worker.stop)  # its threads wait on this loop: never block it
        await engine.dispose()


# --- the contract ----------------------------------------------------------------------------------


class TestDelivery:
    async def test_a_message_runs_its_task_once_with_the_typed_payload_and_request_id(
        self, harness: Harness
    ) -> None:
        key, request_id = uuid.uuid4().hex, f"req-{uuid.uuid4().hex}"
        message = harness.message("contract.record", {"key": key, "n": 3}, request_id=request_id)
        message_id = message.kwargs["message_id"]

        await harness.send(message)
        await eventually(lambda: harness.processed.of(message_id) == [None], "the message to be processed")

        (run,) = harness.probe.of(key)
        assert run.task == "contract.record"
        assert isinstance(run.payload, Note)
        assert run.payload == Note(key=key, n=3)
        assert run.message_id == message_id
        assert run.request_id == request_id
        assert run.request_id_in_context == request_id  # the task's logs carry the caller's id
        assert request_id_var.get() == "-"  # and it does not leak into this context

    async def test_the_task_body_writes_are_committed(self, harness: Harness) -> None:
        key = uuid.uuid4().hex
        message = harness.message("contract.record", {"key": key})
        message_id = message.kwargs["message_id"]

        await harness.send(message)
        await eventually(lambda: harness.processed.of(message_id) == [None], "the message to be processed")

        users = await harness.users(key)  # a new session: only committed rows are visible
        assert [u.email for u in users] == [f"{key}@contract.test"]
        assert await harness.inbox(message_id) == ["contract.record"]

    async def test_the_same_message_id_delivered_twice_takes_effect_once(self, harness: Harness) -> None:
        key = uuid.uuid4().hex
        message_id = str(uuid.uuid4())
        first = harness.message("contract.record", {"key": key, "n": 1}, message_id=message_id)
        again = harness.message("contract.record", {"key": key, "n": 1}, message_id=message_id)
        assert first.message_id != again.message_id  # two deliveries, as a relay retry would make

        await harness.send(first)
        await harness.send(again)
        await eventually(lambda: harness.processed.of(message_id) == [None, None], "both deliveries")

        assert len(harness.probe.of(key)) == 1
        assert len(await harness.users(key)) == 1
        assert await harness.inbox(message_id) == ["contract.record"]

    async def test_a_task_that_fails_once_is_retried_and_takes_effect_once(self, harness: Harness) -> None:
        key = uuid.uuid4().hex
        message = harness.message("contract.flaky", {"key": key})
        message_id = message.kwargs["message_id"]

        await harness.send(message)
        await eventually(lambda: None in harness.processed.of(message_id), "the retry to succeed")

        assert harness.processed.of(message_id) == ["RuntimeError", None]
        assert harness.probe.attempts[key] == 2
        assert [r.task for r in harness.probe.of(key)] == ["contract.flaky"]
        assert len(await harness.users(key)) == 1  # the failed attempt's write was rolled back
        assert await harness.inbox(message_id) == ["contract.flaky"]

    async def test_a_task_that_always_fails_stops_after_max_retries_without_effect(
        self, harness: Harness
    ) -> None:
        key = uuid.uuid4().hex
        message = harness.message("contract.doomed", {"key": key})
        message_id = message.kwargs["message_id"]

        await harness.send(message)
        await eventually(lambda: len(harness.processed.of(message_id)) == 3, "three attempts")

        assert harness.processed.of(message_id) == ["RuntimeError"] * 3  # the first try + 2 retries
        assert harness.probe.attempts[key] == 3
        assert await harness.users(key) == []
        assert await harness.inbox(message_id) == []  # nothing claimed: a manual replay would run

    async def test_relay_and_runner_deliver_an_outbox_row_end_to_end(self, harness: Harness) -> None:
        async with harness.sessions() as session:
            await session.execute(delete(OutboxMessage))
            await session.commit()
        relay = OutboxRelay(harness.sessions, harness.send, ROUTES, harness.runner.queue_of, poll_interval=60)
        passes: list[int] = []
        relay_once = relay.relay_once

        async def counted() -> int:
            passes.append(await relay_once())
            return passes[-1]

        relay.relay_once = counted  # type: ignore[method-assign]
        relay.start()
        try:
            await eventually(lambda: passes == [0], "the relay's first (empty) pass")
            key, request_id = uuid.uuid4().hex, f"req-{uuid.uuid4().hex}"
            event = Happened(key=key)
            outbox = Outbox(notify=relay.kick)
            token = request_id_var.set(request_id)
            try:
                async with UnitOfWork(harness.sessions) as session:
                    outbox.publish(session, event)
                    outbox.enqueue(session, "contract.record", Note(key=key, n=9))
            finally:
                request_id_var.reset(token)

            # The relay sleeps 60 s between polls: only the after-commit kick delivers this in time.
            await eventually(lambda: len(harness.probe.of(key)) == 3, "the event's and the job's tasks")
        finally:
            await relay.stop()

        runs = {r.task: r for r in harness.probe.of(key)}
        assert set(runs) == {"contract.on_happened", "contract.audit_happened", "contract.record"}
        assert runs["contract.on_happened"].payload == event
        assert isinstance(runs["contract.audit_happened"].payload, Happened)
        assert runs["contract.on_happened"].message_id == str(event.event_id)
        assert runs["contract.audit_happened"].message_id == str(event.event_id)
        assert runs["contract.record"].payload == Note(key=key, n=9)
        assert {r.request_id_in_context for r in runs.values()} == {request_id}
        assert len(await harness.users(key)) == 1
        async with harness.sessions() as session:
            rows = (await session.scalars(select(OutboxMessage))).all()
        assert len(rows) == 2
        assert all(r.published_at is not None for r in rows)


# --- reachability ----------------------------------------------------------------------------------


class TestPing:
    async def test_ping_broker_succeeds(self, broker: dramatiq.Broker) -> None:
        await asyncio.to_thread(ping_broker, broker)

    @pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
    async def test_ping_broker_fails_when_nothing_listens(self, kind: str) -> None:
        port = _closed_port()
        made = _network_broker(kind, port)
        try:
            with pytest.raises(Exception) as caught:  # noqa: PT011 - each client has its own error type
                await asyncio.to_thread(ping_broker, made)
            assert not isinstance(caught.value, AssertionError)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(made.close)

    @pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
    async def test_ping_broker_fails_after_the_server_goes_away(self, kind: str) -> None:
        """A thread that already holds a broker connection must not take it as proof: readiness
        has to notice a server that went away (pika's ``is_open`` stays True until I/O)."""
        require(kind)
        proxy = TcpProxy(6379 if kind == "redis" else 5672)
        made = _network_broker(kind, await proxy.start())
        one_thread = ThreadPoolExecutor(max_workers=1)  # the thread that opened the connection
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(one_thread, ping_broker, made)
            if kind == "rabbitmq":  # what BrokerSender leaves behind: this thread's cached connection
                cached = await loop.run_in_executor(one_thread, lambda: made.connection)  # type: ignore[attr-defined]
                assert cached.is_open
            await proxy.close()
            with pytest.raises(Exception) as caught:  # noqa: PT011
                await loop.run_in_executor(one_thread, ping_broker, made)
            assert not isinstance(caught.value, AssertionError)
        finally:
            await proxy.close()
            with contextlib.suppress(Exception):
                await loop.run_in_executor(one_thread, made.close)
            one_thread.shutdown(wait=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _network_broker(kind: str, port: int) -> dramatiq.Broker:
    if kind == "redis":
        return redis_broker(f"redis://127.0.0.1:{port}/0", namespace=f"atrium-contract-{uuid.uuid4().hex}",
                            **RETRY)
    return rabbitmq_broker(f"amqp://guest:guest@127.0.0.1:{port}/%2F", **RETRY)


class TcpProxy:
    """Forwards a local port to a real server until ``close()`` cuts every connection."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        self._writers += [writer, up_writer]
        pipes = {
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        }
        self._pipes |= pipes
        await asyncio.gather(*pipes, return_exceptions=True)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()
        if self._pipes:
            await asyncio.wait(self._pipes, timeout=5)
