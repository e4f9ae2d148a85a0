"""The trace context through the outbox (core/messaging): stored with the row, sent by the relay in a
PRODUCER span, continued by each attempt of the job in a CONSUMER span linked to it.

In process, spans exported to memory; tests/api/test_trace_through_outbox.py proves the same with
real processes and a real OTLP receiver.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.messaging.events import IntegrationEvent
from core.messaging.outbox import Inbox, Outbox, OutboxMessage, OutboxRelay
from core.messaging.queue import (
    EVENT_OPTION,
    TRACE_OPTION,
    TRACESTATE_MAX,
    Delivery,
    JobContext,
    JobRunner,
    LoopBridge,
    fit_tracestate,
    stub_broker,
    task,
)
from core.observability import metrics, tracing
from tests.support.db import migrated
from tests.support.settings import make_settings
from tests.support.waiting import eventually

TRACE_ID, SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
REQUEST = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "tracestate": "vendor=opaque,other=1"}


class Happened(IntegrationEvent):
    name = "probe.Happened"


@task("probe.works")
async def works(ctx: JobContext, payload: dict[str, Any]) -> None:
    return None


@task("probe.breaks", max_retries=1, on_exhausted=lambda ctx, payload, error: asyncio.sleep(0))
async def breaks(ctx: JobContext, payload: dict[str, Any]) -> None:
    raise RuntimeError("always fails")


@pytest.fixture
def record() -> Iterator[Callable[[], InMemorySpanExporter]]:
    """Tracing on with an in-memory exporter (each span exported as it ends); off afterwards."""

    def start() -> InMemorySpanExporter:
        exporter = InMemorySpanExporter()
        settings = make_settings(otel_exporter_otlp_endpoint="http://127.0.0.1:4318")
        tracing.configure_tracing(settings, "worker", exporter=exporter)
        return exporter

    try:
        yield start
    finally:
        tracing.shutdown_tracing()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(await migrated(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"))
    yield engine
    await engine.dispose()


async def rows(engine: AsyncEngine) -> list[OutboxMessage]:
    async with session_factory(engine)() as session:
        return list((await session.scalars(select(OutboxMessage).order_by(OutboxMessage.created_at))).all())


async def write(engine: AsyncEngine, *events: IntegrationEvent, job: str | None = None) -> None:
    async with UnitOfWork(session_factory(engine)) as session:
        for event in events:
            Outbox().publish(session, event)
        if job is not None:
            Outbox().enqueue(session, job, {"n": 1})


def in_request() -> Any:
    """A span standing for the request: a child of REQUEST's context (so it carries its tracestate)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(REQUEST)
    return tracing.tracer("test").start_as_current_span("request", context=parent, kind=SpanKind.SERVER)


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format_trace_id(span.context.trace_id), format_span_id(span.context.span_id)


def parent_id(span: ReadableSpan) -> str | None:
    return format_span_id(span.parent.span_id) if span.parent is not None else None


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- the row ---------------------------------------------------------------------------------------


class TestTheRow:
    async def test_with_tracing_off_no_context_is_stored(self, engine: AsyncEngine) -> None:
        await write(engine, Happened(), job="probe.works")
        assert [(r.traceparent, r.tracestate) for r in await rows(engine)] == [(None, None)] * 2

    async def test_with_tracing_on_the_current_span_is_stored_in_the_same_transaction(
        self, engine: AsyncEngine, record: Callable[[], InMemorySpanExporter]
    ) -> None:
        exporter = record()
        await write(engine, job="probe.works")  # no span current: nothing to continue
        with in_request():
            await write(engine, Happened(), job="probe.works")

        request = next(s for s in exporter.get_finished_spans() if s.name == "request")
        trace_id, span_id = ids(request)
        first, *traced = await rows(engine)
        assert (first.traceparent, first.tracestate) == (None, None)
        assert [(r.traceparent, r.tracestate) for r in traced] == [
            (f"00-{trace_id}-{span_id}-01", REQUEST["tracestate"])] * 2
        assert trace_id == TRACE_ID

    def test_a_tracestate_too_long_for_the_column_loses_whole_entries_from_its_end(self) -> None:
        entries = [f"v{n}={'x' * 60}" for n in range(12)]  # 12 x 64 characters, with the commas
        kept = fit_tracestate(",".join(entries))
        assert kept is not None
        assert len(kept) <= TRACESTATE_MAX
        assert kept == ",".join(entries[: len(kept.split(","))])
        assert fit_tracestate("a=1") == "a=1"
        assert fit_tracestate("a=" + "x" * 600) is None


# --- the relay -------------------------------------------------------------------------------------


def relay_for(engine: AsyncEngine, sent: list[dramatiq.Message[Any]],
              registry: CollectorRegistry | None = None, fail: bool = False) -> OutboxRelay:
    async def send(message: dramatiq.Message[Any]) -> None:
        if fail:
            raise ConnectionError("broker down")
        sent.append(message)

    routes = {Happened.name: ["probe.works", "probe.breaks"]}
    return OutboxRelay(session_factory(engine), send, routes, lambda name: f"q.{name.split('.')[0]}",
                       metrics=metrics.OutboxMetrics(registry) if registry is not None else None)


class TestTheRelay:
    async def test_each_message_is_sent_in_a_producer_span_continuing_the_stored_context(
        self, engine: AsyncEngine, record: Callable[[], InMemorySpanExporter]
    ) -> None:
        exporter = record()
        with in_request():
            await write(engine, Happened())
        request = next(s for s in exporter.get_finished_spans() if s.name == "request")
        exporter.clear()
        sent: list[dramatiq.Message[Any]] = []

        assert await relay_for(engine, sent).relay_once() == 1

        producers = exporter.get_finished_spans()
        assert [(s.name, s.kind) for s in producers] == [("probe.Happened publish", SpanKind.PRODUCER)] * 2
        [row] = await rows(engine)
        for producer, message in zip(producers, sent, strict=True):
            assert ids(producer)[0] == TRACE_ID
            assert parent_id(producer) == ids(request)[1]
            assert attributes(producer) | {
                "messaging.system": "dramatiq",
                "messaging.destination.name": "q.probe",
                "messaging.message.id": message.message_id,
                "atrium.outbox.message_id": str(row.id),
                "atrium.outbox.kind": "event",
                "atrium.module": "probe",
            } == attributes(producer)
            # The job continues from the producer span, not from the request.
            carried = message.options[TRACE_OPTION]
            assert carried["traceparent"] == f"00-{TRACE_ID}-{ids(producer)[1]}-01"
            assert carried["tracestate"] == REQUEST["tracestate"]
            assert message.options[EVENT_OPTION] == Happened.name

    async def test_with_tracing_off_the_stored_context_is_passed_on_as_it_is(
        self, engine: AsyncEngine, record: Callable[[], InMemorySpanExporter]
    ) -> None:
        record()
        with in_request():
            await write(engine, job="probe.works")
        await write(engine, job="probe.works")
        tracing.shutdown_tracing()  # written by a traced API, relayed by an untraced process
        sent: list[dramatiq.Message[Any]] = []

        assert await relay_for(engine, sent).relay_once() == 2

        traced, untraced = sorted(sent, key=lambda m: TRACE_OPTION not in m.options)
        [stored] = [r for r in await rows(engine) if r.traceparent]
        assert traced.options == {TRACE_OPTION: {"traceparent": stored.traceparent,
                                                 "tracestate": stored.tracestate}}
        assert untraced.options == {}  # exactly what the previous version sent

    async def test_a_row_without_context_starts_a_trace_and_a_failed_send_is_an_error(
        self, engine: AsyncEngine, record: Callable[[], InMemorySpanExporter]
    ) -> None:
        exporter = record()
        await write(engine, job="probe.works")

        with pytest.raises(ConnectionError):
            await relay_for(engine, [], fail=True).relay_once()
        assert await relay_for(engine, []).relay_once() == 1

        failed, sent = exporter.get_finished_spans()
        assert (failed.parent, sent.parent) == (None, None)
        assert failed.status.status_code is StatusCode.ERROR
        assert [e.name for e in failed.events] == ["exception"]
        assert sent.status.status_code is StatusCode.UNSET
        assert [attributes(s)["atrium.outbox.attempt"] for s in (failed, sent)] == [1, 2]

    async def test_events_sent_are_counted_per_emitting_module_once_committed(
        self, engine: AsyncEngine
    ) -> None:
        registry = metrics.new_registry()
        await write(engine, Happened(), Happened(), job="probe.works")

        await relay_for(engine, [], registry).relay_once()

        assert registry.get_sample_value("atrium_events_published_total",
                                         {"module": "probe", "event": Happened.name}) == 2
        assert registry.get_sample_value("atrium_outbox_published_total") == 3


# --- the job -------------------------------------------------------------------------------------


@pytest.fixture
async def runner(engine: AsyncEngine) -> AsyncIterator[tuple[JobRunner, CollectorRegistry]]:
    """A JobRunner on a StubBroker with a real dramatiq worker (two threads), and its registry."""
    registry = metrics.new_registry()
    broker = stub_broker(max_retries=3, min_backoff_ms=10, max_backoff_ms=20, time_limit_ms=10_000)
    runner = JobRunner(broker, session_factory(engine), Inbox(), LoopBridge(asyncio.get_running_loop()),
                       containers={"probe": object()}, tasks=[works, breaks],
                       queue_prefix=f"t{uuid.uuid4().hex[:6]}.", metrics=metrics.JobMetrics(registry))
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    await asyncio.to_thread(worker.start)
    try:
        yield runner, registry
    finally:
        await asyncio.to_thread(worker.stop)


def message(runner: JobRunner, name: str, **options: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=runner.queue_of(name), actor_name=name, args=(), options=options,
                            kwargs={"message_id": str(uuid.uuid4()), "request_id": "req-1234", "payload": {}})


def consumers(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return sorted((s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER),
                  key=lambda s: s.start_time or 0)


class TestTheJob:
    async def test_each_attempt_is_a_consumer_span_child_of_the_carried_context_and_linked_to_it(
        self, runner: tuple[JobRunner, CollectorRegistry], record: Callable[[], InMemorySpanExporter]
    ) -> None:
        jobs, _ = runner
        exporter = record()
        producer = f"00-{TRACE_ID}-{SPAN_ID}-01"

        jobs.broker.enqueue(message(jobs, "probe.breaks", **{TRACE_OPTION: {"traceparent": producer}}))
        await eventually(lambda: len(consumers(exporter)) == 3)

        first, retry, give_up = consumers(exporter)
        assert [s.name for s in (first, retry, give_up)] == [
            "probe.breaks process", "probe.breaks process", "probe.breaks give_up"]
        for span in (first, retry, give_up):
            assert ids(span)[0] == TRACE_ID
            assert parent_id(span) == SPAN_ID
            assert [format_span_id(link.context.span_id) for link in span.links] == [SPAN_ID]
            assert attributes(span)["atrium.module"] == "probe"
            assert attributes(span)["atrium.request_id"] == "req-1234"
            assert attributes(span)["messaging.destination.name"] == jobs.queue_of("probe.breaks")
        assert [attributes(s)["atrium.job.attempt"] for s in (first, retry)] == [1, 2]
        assert [s.status.status_code for s in (first, retry)] == [StatusCode.ERROR] * 2
        assert all([e.name for e in s.events] == ["exception"] for s in (first, retry))
        assert give_up.status.status_code is StatusCode.UNSET

    async def test_a_message_of_the_previous_version_runs_and_starts_a_trace(
        self, runner: tuple[JobRunner, CollectorRegistry], record: Callable[[], InMemorySpanExporter]
    ) -> None:
        jobs, registry = runner
        exporter = record()

        jobs.broker.enqueue(message(jobs, "probe.works"))  # options={}: no context, no event
        await eventually(lambda: len(consumers(exporter)) == 1)

        [span] = consumers(exporter)
        assert (span.name, span.parent, tuple(span.links)) == ("probe.works process", None, ())
        assert span.status.status_code is StatusCode.UNSET
        assert registry.get_sample_value("atrium_jobs_processed_total", {"task": "probe.works"}) == 1
        assert registry.get_sample_value("atrium_events_consumed_total",
                                         {"module": "probe", "task": "probe.works"}) is None

    async def test_an_event_handled_is_counted_once_per_effect(
        self, runner: tuple[JobRunner, CollectorRegistry]
    ) -> None:
        jobs, registry = runner
        event = message(jobs, "probe.works", **{EVENT_OPTION: Happened.name})

        jobs.broker.enqueue(event)
        jobs.broker.enqueue(event.copy())  # the same message delivered twice: one effect
        await eventually(lambda: registry.get_sample_value("atrium_jobs_processed_total",
                                                           {"task": "probe.works"}) == 2)

        assert registry.get_sample_value("atrium_events_consumed_total",
                                         {"module": "probe", "task": "probe.works"}) == 1

    async def test_a_duplicate_is_marked_on_its_span(
        self, runner: tuple[JobRunner, CollectorRegistry], record: Callable[[], InMemorySpanExporter]
    ) -> None:
        jobs, _ = runner
        exporter = record()
        delivery = Delivery(trace_context={"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"})

        assert await jobs.execute("probe.works", "m-1", "-", {}, delivery) is True
        assert await jobs.execute("probe.works", "m-1", "-", {}, delivery) is False

        done, skipped = consumers(exporter)
        assert "atrium.job.duplicate" not in attributes(done)
        assert attributes(skipped)["atrium.job.duplicate"] is True
