"""The event-publication registry on SQLite and on PostgreSQL: the relay writes one row per message
it sends, the job completes it (whichever commits first), its last failed retry marks it failed, and
the resubmitter sends again only what stayed incomplete too long.

Each test has a migrated database of its own per backend (isolation by database); the relay and the
jobs open their own sessions and commit, as in production.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dramatiq
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from dramatiq import Message
from prometheus_client import CollectorRegistry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from core.db.base import Base, utcnow
from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.messaging import publications
from core.messaging.events import IntegrationEvent
from core.messaging.outbox import Inbox, Outbox, OutboxMessage, OutboxRelay
from core.messaging.periodic import CORE, PeriodicRunner
from core.messaging.publications import COMPLETED, FAILED, PUBLISHED, RESUBMITTED, EventPublication
from core.messaging.queue import JobContext, JobRunner, LoopBridge, stub_broker, task
from core.messaging.resubmit import CORE_PERIODIC, Resubmitter
from core.observability.context import request_id_var
from core.observability.metrics import OutboxMetrics

REPO = Path(__file__).resolve().parents[2]
RECORD, AUDIT, FAIL = "contract.record", "contract.audit", "contract.fail"


class Happened(IntegrationEvent):
    name = "contract.Happened"

    key: str


@dataclass
class Probe:
    """``ctx.container`` of the tasks: every run that took effect."""

    runs: list[tuple[str, str]] = field(default_factory=list)  # (task, message id)


@task(RECORD)
async def record(ctx: JobContext, payload: dict[str, Any]) -> None:
    ctx.container.runs.append((RECORD, ctx.message_id))


@task(AUDIT)
async def audit(ctx: JobContext, payload: dict[str, Any]) -> None:
    ctx.container.runs.append((AUDIT, ctx.message_id))


@task(FAIL, max_retries=0)
async def fail(ctx: JobContext, payload: dict[str, Any]) -> None:
    raise RuntimeError("the gateway said no")


ROUTES = {Happened.name: [RECORD, AUDIT]}


class RecordingSend:
    """A broker that keeps what it is given (and runs ``during`` on each message first)."""

    def __init__(self, during: Callable[[Message[Any]], Any] | None = None) -> None:
        self.sent: list[Message[Any]] = []
        self.during = during

    async def __call__(self, message: Message[Any]) -> None:
        if self.during is not None:
            await self.during(message)
        self.sent.append(message)


@dataclass
class Registry:
    backend: str
    sessions: async_sessionmaker[AsyncSession]
    runner: JobRunner
    probe: Probe
    send: RecordingSend
    relay: OutboxRelay

    async def publications(self) -> dict[tuple[str, str], EventPublication]:
        async with self.sessions() as session:
            rows = (await session.scalars(select(EventPublication))).all()
        return {(str(r.message_id), r.task): r for r in rows}

    async def run(self, message: Message[Any]) -> bool:
        """The job of ``message``, as the worker would run it."""
        kwargs = message.kwargs
        return bool(await self.runner.execute(message.actor_name, kwargs["message_id"], kwargs["request_id"],
                                              kwargs["payload"]))

    async def age(self, message_id: str, task_name: str, seconds: float, **values: Any) -> None:
        """Move a publication's times ``seconds`` into the past (and set ``values``)."""
        past = utcnow() - timedelta(seconds=seconds)
        async with UnitOfWork(self.sessions) as session:
            await session.execute(
                update(EventPublication)
                .where(EventPublication.message_id == uuid.UUID(message_id),
                       EventPublication.task == task_name)
                .values(published_at=past, **values))


@pytest.fixture(params=["sqlite", "postgres"])
def registry_database(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, url) of a migrated database of the test's own."""
    return request.param, request.getfixturevalue(f"private_{request.param}_url")


@pytest.fixture
async def registry(registry_database: tuple[str, str]) -> AsyncIterator[Registry]:
    backend, url = registry_database
    engine = create_engine(url, pool_size=5)
    sessions = session_factory(engine)
    broker = stub_broker(max_retries=0, min_backoff_ms=10, max_backoff_ms=10, time_limit_ms=10_000)
    bridge = LoopBridge()
    bridge.bind(asyncio.get_running_loop())
    probe = Probe()
    runner = JobRunner(broker, sessions, Inbox(), bridge, containers={"contract": probe},
                       tasks=[record, audit, fail], queue_prefix="t.")
    send = RecordingSend()
    relay = OutboxRelay(sessions, send, ROUTES, runner.queue_of)
    try:
        yield Registry(backend, sessions, runner, probe, send, relay)
    finally:
        await engine.dispose()


async def _write(registry: Registry, *, event: Happened | None = None,
                 job: dict[str, Any] | None = None) -> None:
    token = request_id_var.set("req-registry-1")
    try:
        async with UnitOfWork(registry.sessions) as session:
            if event is not None:
                Outbox().publish(session, event)
            if job is not None:
                Outbox().enqueue(session, RECORD, job)
    finally:
        request_id_var.reset(token)


async def _job_id(registry: Registry) -> str:
    async with registry.sessions() as session:
        return str(await session.scalar(select(OutboxMessage.id).where(OutboxMessage.name == RECORD)))


# --- written by the relay, completed by the job ---------------------------------------------------


class TestRelayAndJob:
    async def test_the_relay_writes_one_published_row_per_message_sent(self, registry: Registry) -> None:
        event = Happened(key="fan out")
        await _write(registry, event=event, job={"n": 1})
        job_id = await _job_id(registry)
        before = utcnow()

        assert await registry.relay.relay_once() == 2

        rows = await registry.publications()
        assert set(rows) == {(str(event.event_id), RECORD), (str(event.event_id), AUDIT), (job_id, RECORD)}
        for row in rows.values():
            assert (row.status, row.resubmissions, row.completed_at) == (PUBLISHED, 0, None)
            assert row.last_error is None
            assert row.published_at is not None
            assert before - timedelta(seconds=1) <= row.published_at <= utcnow() + timedelta(seconds=1)
        assert await registry.relay.relay_once() == 0  # nothing sent twice, nothing written twice
        assert len(await registry.publications()) == 3

    async def test_an_event_nobody_subscribes_to_writes_no_row(self, registry: Registry) -> None:
        relay = OutboxRelay(registry.sessions, registry.send, {}, registry.runner.queue_of)
        await _write(registry, event=Happened(key="unheard"))

        assert await relay.relay_once() == 1
        assert await registry.publications() == {}

    async def test_the_job_completes_its_publication(self, registry: Registry) -> None:
        event = Happened(key="done")
        await _write(registry, event=event)
        await registry.relay.relay_once()
        to_record = next(m for m in registry.send.sent if m.actor_name == RECORD)

        assert await registry.run(to_record) is True

        rows = await registry.publications()
        done, waiting = rows[(str(event.event_id), RECORD)], rows[(str(event.event_id), AUDIT)]
        assert done.status == COMPLETED
        assert done.completed_at is not None
        assert done.published_at is not None
        assert done.published_at <= done.completed_at
        assert waiting.status == PUBLISHED  # the other subscriber's job has not run

    async def test_a_job_that_commits_before_the_relay_still_ends_completed(self, registry: Registry) -> None:
        """The relay sends before it commits: the job may be done first. Its row is never downgraded."""
        await _write(registry, job={"n": 2})
        job_id = await _job_id(registry)
        if registry.backend == "postgres":
            # The real race: the job runs and commits while the relay's transaction is still open.
            async def run_now(message: Message[Any]) -> None:
                assert await registry.run(message) is True

            racing = RecordingSend(during=run_now)
            relay = OutboxRelay(registry.sessions, racing, ROUTES, registry.runner.queue_of)
            assert await relay.relay_once() == 1
            assert len(racing.sent) == 1
        else:
            # SQLite serialises transactions (BEGIN IMMEDIATE): the same order, one after the other.
            message = registry.relay.message(await _row(registry, job_id), RECORD)
            assert await registry.run(message) is True
            assert (await registry.publications())[(job_id, RECORD)].published_at is None
            assert await registry.relay.relay_once() == 1

        row = (await registry.publications())[(job_id, RECORD)]
        assert row.status == COMPLETED
        assert row.completed_at is not None
        assert registry.probe.runs == [(RECORD, job_id)]

    async def test_a_duplicate_delivery_leaves_it_completed(self, registry: Registry) -> None:
        await _write(registry, job={"n": 3})
        await registry.relay.relay_once()
        (message,) = registry.send.sent
        assert await registry.run(message) is True
        job_id = message.kwargs["message_id"]
        await registry.age(job_id, RECORD, 0, status=RESUBMITTED, completed_at=None)  # as if resubmitted

        assert await registry.run(message) is False  # the inbox: no effect

        row = (await registry.publications())[(job_id, RECORD)]
        assert row.status == COMPLETED
        assert registry.probe.runs == [(RECORD, job_id)]

    async def test_a_message_from_elsewhere_writes_nothing(self, registry: Registry) -> None:
        assert await registry.runner.execute(RECORD, "not-an-outbox-id", "-", {"n": 0}) is True
        assert await registry.publications() == {}


async def _row(registry: Registry, message_id: str) -> OutboxMessage:
    async with registry.sessions() as session:
        row = await session.get(OutboxMessage, uuid.UUID(message_id))
    assert row is not None
    return row


# --- failed: the last retry failed ----------------------------------------------------------------


class TestFailed:
    async def test_the_last_failed_retry_marks_it_failed_with_the_error(self, registry: Registry) -> None:
        async with UnitOfWork(registry.sessions) as session:
            Outbox().enqueue(session, FAIL, {"n": 1})
        broker = registry.runner.broker
        relay = OutboxRelay(registry.sessions, broker.enqueue, ROUTES, registry.runner.queue_of)
        assert await relay.relay_once() == 1
        worker = dramatiq.Worker(registry.runner.broker, worker_threads=1, worker_timeout=100)
        await asyncio.to_thread(worker.start)
        try:
            for _ in range(200):
                rows = list((await registry.publications()).values())
                if rows and rows[0].status != PUBLISHED:
                    break
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(worker.stop)  # its thread waits on this loop: never block it
        (row,) = rows
        assert row.status == FAILED
        assert row.failed_at is not None
        assert row.last_error == "RuntimeError: the gateway said no"

    async def test_a_failure_never_overwrites_a_completion(self, registry: Registry) -> None:
        message_id = str(uuid.uuid4())
        async with UnitOfWork(registry.sessions) as session:
            await publications.mark_completed(session, message_id, RECORD)
        await publications.record_failure(registry.sessions, message_id, RECORD, RuntimeError("late"))

        row = (await registry.publications())[(message_id, RECORD)]
        assert (row.status, row.failed_at, row.last_error) == (COMPLETED, None, None)

    async def test_a_completion_overwrites_a_failure(self, registry: Registry) -> None:
        """An operator resubmitted a failed message and its job succeeded this time."""
        message_id = str(uuid.uuid4())
        await publications.record_failure(registry.sessions, message_id, RECORD, "x" * 2000)
        assert len((await registry.publications())[(message_id, RECORD)].last_error or "") == 500

        async with UnitOfWork(registry.sessions) as session:
            await publications.mark_completed(session, message_id, RECORD)

        assert (await registry.publications())[(message_id, RECORD)].status == COMPLETED


# --- the resubmitter -------------------------------------------------------------------------------


async def _four_jobs(registry: Registry) -> dict[str, str]:
    """Four jobs relayed; their ids by what the test makes of them."""
    for n in range(4):
        await _write(registry, job={"n": n})
    await registry.relay.relay_once()
    ids = {m.kwargs["payload"]["n"]: m.kwargs["message_id"] for m in registry.send.sent}
    named = {"stale": ids[0], "recent": ids[1], "completed": ids[2], "failed": ids[3]}
    await registry.age(named["stale"], RECORD, 120)
    await registry.age(named["completed"], RECORD, 120, status=COMPLETED, completed_at=utcnow())
    await registry.age(named["failed"], RECORD, 120, status=FAILED, failed_at=utcnow(), last_error="E: no")
    registry.send.sent.clear()
    return named


class TestResubmit:
    async def test_only_stale_incomplete_publications_are_sent_again_the_same(
        self, registry: Registry
    ) -> None:
        ids = await _four_jobs(registry)
        original = registry.relay.message(await _row(registry, ids["stale"]), RECORD)
        metrics = OutboxMetrics(CollectorRegistry())

        resubmitter = Resubmitter(registry.sessions, registry.relay, metrics=metrics)
        done = await resubmitter.resubmit(older_than=60, limit=3)

        assert [(str(r.message_id), r.task, r.status, r.resubmissions) for r in done] == [
            (ids["stale"], RECORD, PUBLISHED, 1)]
        assert done[0].age_seconds >= 119
        (sent,) = registry.send.sent
        assert (sent.actor_name, sent.queue_name, sent.kwargs) == (
            original.actor_name, original.queue_name, original.kwargs)
        assert sent.kwargs["request_id"] == "req-registry-1"
        rows = await registry.publications()
        stale = rows[(ids["stale"], RECORD)]
        assert (stale.status, stale.resubmissions) == (RESUBMITTED, 1)
        assert stale.resubmitted_at is not None
        assert {k[0]: r.status for k, r in rows.items()} == {
            ids["stale"]: RESUBMITTED, ids["recent"]: PUBLISHED, ids["completed"]: COMPLETED,
            ids["failed"]: FAILED}
        assert _sample(metrics, RECORD) == 1.0

    async def test_a_resubmitted_one_waits_the_threshold_again_and_the_limit_ends_it(
        self, registry: Registry
    ) -> None:
        ids = await _four_jobs(registry)
        resubmitter = Resubmitter(registry.sessions, registry.relay)

        assert len(await resubmitter.resubmit(older_than=60, limit=2)) == 1
        assert await resubmitter.resubmit(older_than=60, limit=2) == []  # just sent: not stale yet
        await registry.age(ids["stale"], RECORD, 120, resubmitted_at=utcnow() - timedelta(seconds=90))
        assert [r.resubmissions for r in await resubmitter.resubmit(older_than=60, limit=2)] == [2]
        await registry.age(ids["stale"], RECORD, 120, resubmitted_at=utcnow() - timedelta(seconds=90))
        assert await resubmitter.resubmit(older_than=60, limit=2) == []  # the limit: an operator decides

        row = (await registry.publications())[(ids["stale"], RECORD)]
        assert (row.status, row.resubmissions) == (RESUBMITTED, 2)
        assert len(registry.send.sent) == 2
        # The operator's command has no limit (limit=None).
        assert [r.resubmissions for r in await resubmitter.resubmit(older_than=60)] == [3]

    async def test_failed_ones_only_when_asked_and_one_by_id(self, registry: Registry) -> None:
        ids = await _four_jobs(registry)
        resubmitter = Resubmitter(registry.sessions, registry.relay)

        dry = await resubmitter.resubmit(older_than=60, include_failed=True, dry_run=True)
        assert sorted(str(r.message_id) for r in dry) == sorted([ids["stale"], ids["failed"]])
        assert registry.send.sent == []  # a dry run sends nothing and marks nothing
        assert (await registry.publications())[(ids["failed"], RECORD)].status == FAILED

        by_id = await resubmitter.resubmit(older_than=600, message_id=uuid.UUID(ids["failed"]))
        assert [(str(r.message_id), r.status) for r in by_id] == [(ids["failed"], FAILED)]
        assert [m.kwargs["message_id"] for m in registry.send.sent] == [ids["failed"]]
        assert (await registry.publications())[(ids["failed"], RECORD)].status == RESUBMITTED

    async def test_a_resubmitted_message_whose_job_already_ran_is_a_no_op_that_ends_completed(
        self, registry: Registry
    ) -> None:
        """The first delivery was slow, not lost: both run, the inbox lets one take effect."""
        ids = await _four_jobs(registry)
        original = registry.relay.message(await _row(registry, ids["stale"]), RECORD)
        await Resubmitter(registry.sessions, registry.relay).resubmit(older_than=60, limit=3)
        (again,) = registry.send.sent

        assert await registry.run(original) is True
        first = (await registry.publications())[(ids["stale"], RECORD)].completed_at
        assert await registry.run(again) is False

        assert registry.probe.runs == [(RECORD, ids["stale"])]
        row = (await registry.publications())[(ids["stale"], RECORD)]
        assert (row.status, row.resubmissions) == (COMPLETED, 1)
        assert row.completed_at == first  # the duplicate keeps the first completion's time

    async def test_a_task_no_module_runs_is_marked_failed_not_resent_forever(
        self, registry: Registry
    ) -> None:
        ids = await _four_jobs(registry)
        await registry.age(ids["stale"], RECORD, 120, task="gone.task")

        done = await Resubmitter(registry.sessions, registry.relay).resubmit(older_than=60, limit=3)

        assert [(r.task, r.error is not None) for r in done] == [("gone.task", True)]
        assert registry.send.sent == []
        row = (await registry.publications())[(ids["stale"], "gone.task")]
        assert row.status == FAILED
        assert (row.last_error or "").startswith("unroutable")

    async def test_a_broker_failure_keeps_what_was_sent_marked(self, registry: Registry) -> None:
        ids = await _four_jobs(registry)
        await registry.age(ids["recent"], RECORD, 100)
        calls: list[str] = []

        async def flaky(message: Message[Any]) -> None:
            calls.append(message.kwargs["message_id"])
            if len(calls) == 2:
                raise ConnectionError("broker down")

        relay = OutboxRelay(registry.sessions, flaky, ROUTES, registry.runner.queue_of)
        with pytest.raises(ConnectionError):
            await Resubmitter(registry.sessions, relay).resubmit(older_than=60, limit=3)

        rows = await registry.publications()
        assert rows[(ids["stale"], RECORD)].status == RESUBMITTED  # sent first (the oldest)
        assert rows[(ids["recent"], RECORD)].status == PUBLISHED

    async def test_purge_deletes_only_completed_ones_past_the_retention(self, registry: Registry) -> None:
        ids = await _four_jobs(registry)
        await registry.age(ids["completed"], RECORD, 120, completed_at=utcnow() - timedelta(days=8))
        await registry.age(ids["recent"], RECORD, 0, status=COMPLETED, completed_at=utcnow())

        assert await Resubmitter(registry.sessions, registry.relay).purge(7 * 86_400) == 1

        assert sorted(k[0] for k in await registry.publications()) == sorted(
            [ids["stale"], ids["recent"], ids["failed"]])

    async def test_the_workers_periodic_job_resubmits_and_purges(self, registry: Registry) -> None:
        ids = await _four_jobs(registry)
        await registry.age(ids["completed"], RECORD, 120, completed_at=utcnow() - timedelta(days=8))
        metrics = OutboxMetrics(CollectorRegistry())
        settings = SimpleNamespace(outbox_resubmit_after_seconds=60.0, outbox_resubmit_limit=3,
                                   outbox_resubmit_interval_seconds=30.0,
                                   outbox_publication_retention_days=7.0)
        root = SimpleNamespace(settings=lambda: settings, relay=lambda: registry.relay,
                               outbox_metrics=lambda: metrics)
        runner = PeriodicRunner(registry.sessions, {CORE: root}, list(CORE_PERIODIC), settings)
        assert runner.names == ["core.resubmit_publications"]

        await runner.run_once("core.resubmit_publications")

        assert [m.kwargs["message_id"] for m in registry.send.sent] == [ids["stale"]]
        rows = await registry.publications()
        assert (ids["completed"], RECORD) not in rows
        assert rows[(ids["failed"], RECORD)].status == FAILED  # never automatically
        assert _sample(metrics, RECORD) == 1.0


def _sample(metrics: OutboxMetrics, task_name: str) -> float:
    for family in metrics.resubmitted.collect():
        for sample in family.samples:
            if sample.name == "atrium_events_resubmitted_total" and sample.labels == {"task": task_name}:
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("registry_database", ["postgres"], indirect=True)
class TestResubmitConcurrency:
    """PostgreSQL only: two workers' resubmitters never send the same publication."""

    async def test_rows_another_resubmitter_holds_are_skipped(self, registry: Registry) -> None:
        ids = await _four_jobs(registry)
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(message: Message[Any]) -> None:
            entered.set()
            await release.wait()

        slow_relay = OutboxRelay(registry.sessions, slow, ROUTES, registry.runner.queue_of)
        holder = Resubmitter(registry.sessions, slow_relay)
        first = asyncio.create_task(holder.resubmit(older_than=60, limit=3))
        try:
            await asyncio.wait_for(entered.wait(), 10)
            assert await Resubmitter(registry.sessions, registry.relay).resubmit(older_than=60, limit=3) == []
            assert registry.send.sent == []
        finally:
            release.set()
        assert [str(r.message_id) for r in await asyncio.wait_for(first, 10)] == [ids["stale"]]


# --- the schema and the documentation ---------------------------------------------------------------


async def test_the_migration_matches_the_model(private_sqlite_url: str) -> None:
    engine = create_async_engine(private_sqlite_url)
    try:
        async with engine.connect() as connection:
            diffs = await connection.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    finally:
        await engine.dispose()

    assert [d for d in diffs if "event_publications" in repr(d)] == []


def test_the_metric_and_the_settings_are_documented() -> None:
    metrics = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    redelivery = (REPO / "docs" / "redelivery.md").read_text(encoding="utf-8")

    assert "| `atrium_events_resubmitted_total` | `task` |" in metrics
    for variable in ("ATRIUM_OUTBOX_RESUBMIT_AFTER_SECONDS", "ATRIUM_OUTBOX_RESUBMIT_LIMIT",
                     "ATRIUM_OUTBOX_RESUBMIT_INTERVAL_SECONDS", "ATRIUM_OUTBOX_PUBLICATION_RETENTION_DAYS",
                     "atrium outbox status", "atrium outbox resubmit"):
        assert variable in redelivery, variable
