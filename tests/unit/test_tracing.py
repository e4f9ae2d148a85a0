"""Tracing (core/observability/tracing.py): spans of real requests, their module, the sampler, the
log lines' ids, the SMTP span, and nothing of the OpenTelemetry SDK while tracing is off."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from config import ConfigError, load_settings
from core.email import EmailDeliveryError, EmailMessage, SmtpEmailSender
from core.observability import access_log, tracing
from core.observability.logging import configure_logging
from main import create_app
from tests.support.api import signup_body
from tests.support.services import require
from tests.support.settings import make_settings
from tests.support.smtp import SmtpServer, free_port
from tests.support.stack import serve

ENDPOINT = "http://127.0.0.1:4318"  # never reached: the tests export to memory


@pytest.fixture
def record() -> Iterator[Callable[..., InMemorySpanExporter]]:
    """Turns tracing on with an in-memory exporter (spans exported as each ends); off afterwards."""

    def start(ratio: float = 1.0) -> InMemorySpanExporter:
        exporter = InMemorySpanExporter()
        settings = make_settings(otel_exporter_otlp_endpoint=ENDPOINT, otel_sampling_ratio=ratio)
        tracing.configure_tracing(settings, "api", exporter=exporter)
        assert tracing.enabled()
        return exporter

    try:
        yield start
    finally:
        tracing.shutdown_tracing()
    assert not tracing.enabled()


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


# --- off: nothing of the SDK ------------------------------------------------------------------------


def test_with_tracing_off_nothing_of_the_sdk_is_imported(sqlite_url: str) -> None:
    """A fresh process builds the app, runs its lifespan and a request without an endpoint.

    Not even the SDK's tracing, an exporter or an instrumentation is loaded. (redis-py 8.2 imports
    ``opentelemetry.sdk.metrics`` itself, at import, whenever the SDK is installed: its own optional
    metrics, which stay off. That is redis-py's, whatever the settings say, so it is not checked.)
    """
    code = (
        "import asyncio, sys\n"
        "from main import create_app\n"
        "from tests.support.settings import make_settings\n"
        "from tests.support.stack import serve\n"
        f"app = create_app(make_settings(database_url={sqlite_url!r}, auto_migrate=False,"
        " run_worker_in_process=False))\n"
        "async def main():\n"
        "    async with serve(app) as client:\n"
        "        assert (await client.get('/api/v1/items')).status_code == 200\n"
        "asyncio.run(main())\n"
        "from core.observability import tracing\n"
        "assert not tracing.enabled()\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace',"
        " 'opentelemetry.instrumentation', 'opentelemetry.exporter')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_an_endpoint_that_is_no_http_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT: grpc:// does not work"):
        load_settings(env="test", otel_exporter_otlp_endpoint="grpc://collector:4317")
    with pytest.raises(ConfigError, match="ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT: no host"):
        load_settings(env="test", otel_exporter_otlp_endpoint="http:///v1/traces")
    assert load_settings(env="test").otel_exporter_otlp_endpoint == ""


def test_configure_without_an_endpoint_does_nothing() -> None:
    tracing.configure_tracing(make_settings(), "api")
    assert not tracing.enabled()


# --- requests through the real app ---------------------------------------------------------------


def app_settings(database_url: str, **overrides: Any) -> Any:
    """A migrated database; no jobs run in the process (stopping that worker takes seconds)."""
    return make_settings(database_url=database_url, auto_migrate=False, run_worker_in_process=False,
                         relay_outbox_in_api=False, otel_exporter_otlp_endpoint=ENDPOINT, **overrides)


@pytest.fixture(params=["on", "off"])
async def traced_app(request: pytest.FixtureRequest, sqlite_url: str,
                     record: Callable[..., InMemorySpanExporter]
                     ) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter]]:
    exporter = record()
    app = create_app(app_settings(sqlite_url, fast_path=request.param))
    assert bool(app.state.container.fast_path()) is (request.param == "on")
    async with serve(app) as client:
        exporter.clear()  # the start-up's spans (none are expected: no parent, no trace)
        yield client, exporter


async def test_a_request_is_a_server_span_of_its_module_with_the_statements_beneath(
    traced_app: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced_app

    assert (await client.get("/api/v1/items")).status_code == 200

    spans = exporter.get_finished_spans()
    server = by_name(spans, "GET /api/v1/items")
    assert server.kind is SpanKind.SERVER
    assert server.parent is None
    assert server.attributes is not None
    assert server.attributes["atrium.module"] == "items"
    assert server.attributes["http.route"] == "/api/v1/items"
    statements = [s for s in children(spans, server) if s.name.startswith("SELECT")]
    assert statements, [s.name for s in spans]
    assert all(s.kind is SpanKind.CLIENT and (s.attributes or {})["atrium.module"] == "items"
               for s in children(spans, server))
    assert server.context is not None
    assert {s.context.trace_id for s in spans if s.context} == {server.context.trace_id}


async def test_a_span_outside_any_module_is_core_and_a_caller_trace_is_continued(
    traced_app: tuple[httpx.AsyncClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced_app
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    response = await client.get("/health/live", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert response.status_code == 200
    assert (await client.get("/no/such/path")).status_code == 404

    health = by_name(exporter.get_finished_spans(), "GET /health/live")
    assert (health.attributes or {})["atrium.module"] == "core"
    assert health.context is not None
    assert health.parent is not None
    assert format_trace_id(health.context.trace_id) == trace_id
    assert format_span_id(health.parent.span_id) == parent_id
    unrouted = by_name(exporter.get_finished_spans(), "GET")
    assert (unrouted.attributes or {})["atrium.module"] == "core"


async def test_a_ratio_of_zero_exports_nothing(sqlite_url: str,
                                               record: Callable[..., InMemorySpanExporter]) -> None:
    exporter = record(ratio=0.0)
    app = create_app(app_settings(sqlite_url, otel_sampling_ratio=0.0))
    async with serve(app) as client:
        for _ in range(20):
            assert (await client.get("/api/v1/items")).status_code == 200
        with tracing.tracer("test").start_as_current_span("root"):
            pass

    assert exporter.get_finished_spans() == ()


# --- the sampler and module_scope ----------------------------------------------------------------


def test_module_scope_stamps_its_spans_and_core_is_the_rest(
        record: Callable[..., InMemorySpanExporter]) -> None:
    exporter = record()
    tracer = tracing.tracer("test")

    with tracing.module_scope("billing"), tracer.start_as_current_span("job"), \
            tracer.start_as_current_span("inner"):
        pass
    with tracer.start_as_current_span("relay"):
        pass

    modules = {s.name: (s.attributes or {})["atrium.module"] for s in exporter.get_finished_spans()}
    assert modules == {"job": "billing", "inner": "billing", "relay": "core"}
    assert tracing.current_module.get() is None


def test_a_client_span_starts_no_trace_but_follows_a_sampled_parent(
        record: Callable[..., InMemorySpanExporter]) -> None:
    exporter = record()
    tracer = tracing.tracer("test")

    with tracer.start_as_current_span("poll", kind=SpanKind.CLIENT):  # a background statement
        pass
    with tracer.start_as_current_span("job", kind=SpanKind.CONSUMER), \
            tracer.start_as_current_span("call", kind=SpanKind.CLIENT):
        pass

    assert sorted(s.name for s in exporter.get_finished_spans()) == ["call", "job"]


@pytest.mark.parametrize(("ratio", "sampled"), [(0.0, 0), (1.0, 200), (0.5, range(60, 141))])
@pytest.mark.parametrize("kind", [SpanKind.CONSUMER, SpanKind.INTERNAL, SpanKind.PRODUCER])
def test_the_ratio_applies_to_new_traces(ratio: float, sampled: int | range, kind: SpanKind) -> None:
    from opentelemetry.sdk.trace.sampling import Decision

    sampler = tracing.build_sampler(ratio)
    count = sum(
        sampler.should_sample(None, trace_id, "x", kind).decision is Decision.RECORD_AND_SAMPLE
        for trace_id in (n * (2**64 // 200) + 1 for n in range(200))  # spread over the 64 bits it reads
    )
    assert count in sampled if isinstance(sampled, range) else count == sampled


def test_a_root_server_span_is_recorded_whatever_the_ratio_as_the_edge_sampled_it() -> None:
    from opentelemetry.sdk.trace.sampling import Decision

    sampler = tracing.build_sampler(0.0)
    decision = sampler.should_sample(None, 12345, "GET /x", SpanKind.SERVER).decision
    assert decision is Decision.RECORD_AND_SAMPLE


# --- log lines ----------------------------------------------------------------------------------------


@pytest.fixture
def stderr_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., list[str]]]:
    def configure(*, json: bool, traced: bool) -> list[str]:
        configure_logging(level="INFO", json=json, enqueue=False, traced=traced)  # sink: captured stderr
        return []

    try:
        yield configure
    finally:
        configure_logging(level="WARNING", enqueue=False)


def _logged(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "hello" in line]


def test_a_json_line_carries_the_ids_of_the_current_span(
        record: Callable[..., InMemorySpanExporter], capsys: pytest.CaptureFixture[str],
        stderr_lines: Callable[..., list[str]]) -> None:
    record()
    stderr_lines(json=True, traced=True)

    logger.info("hello outside")
    with tracing.tracer("test").start_as_current_span("work") as span:
        logger.info("hello inside")

    outside, inside = (json.loads(line) for line in _logged(capsys))
    assert "trace_id" not in outside
    assert "span_id" not in outside
    context = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id)
    assert inside["span_id"] == format_span_id(context.span_id)
    assert list(inside)[:6] == ["ts", "level", "logger", "msg", "request_id", "trace_id"]
    assert "extra" not in inside


def test_a_text_line_carries_them_after_the_request_id_and_nothing_when_off(
        record: Callable[..., InMemorySpanExporter], capsys: pytest.CaptureFixture[str],
        stderr_lines: Callable[..., list[str]]) -> None:
    record()
    stderr_lines(json=False, traced=True)
    with tracing.tracer("test").start_as_current_span("work") as span:
        logger.info("hello traced")
    stderr_lines(json=False, traced=False)
    with tracing.tracer("test").start_as_current_span("work"):
        logger.info("hello untraced")

    traced, untraced = _logged(capsys)
    context = span.get_span_context()
    ids = f"trace_id={format_trace_id(context.trace_id)} span_id={format_span_id(context.span_id)}"
    assert traced.endswith(f" - {ids} hello traced")
    assert untraced.endswith(" - hello untraced")


def test_the_access_line_carries_the_ids_of_the_request_span(
        record: Callable[..., InMemorySpanExporter]) -> None:
    record()
    stream = io.StringIO()
    log = access_log.AccessLog(lambda: stream, json=True, traced=True, interval=60)
    with tracing.tracer("test").start_as_current_span("GET /p", kind=SpanKind.SERVER) as span:
        log.record("GET", "/p", 200, 1.0, "req-1")
    log.record("GET", "/q", 200, 1.0, "req-2")
    log.flush()

    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == format_trace_id(span.get_span_context().trace_id)
    assert inside["span_id"] == format_span_id(span.get_span_context().span_id)
    assert "trace_id" not in outside


# --- SMTP -------------------------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


async def test_an_smtp_send_is_a_client_span_without_the_recipient(
        record: Callable[..., InMemorySpanExporter], smtp_server: SmtpServer) -> None:
    exporter = record()
    sender = SmtpEmailSender(smtp_server.host, smtp_server.port, "Atrium <no-reply@atrium.test>")
    mail = EmailMessage(to="someone.private@example.com", subject="Your receipt", body="Paid.")

    await sender.send(mail)  # no current span: no trace of its own
    with tracing.module_scope("billing"), tracing.tracer("test").start_as_current_span(
            "billing.send_receipt process", kind=SpanKind.CONSUMER):
        await sender.send(mail)

    spans = exporter.get_finished_spans()
    job, smtp = by_name(spans, "billing.send_receipt process"), by_name(spans, "SMTP send")
    assert smtp.kind is SpanKind.CLIENT
    assert smtp.parent is not None
    assert job.context is not None
    assert smtp.parent.span_id == job.context.span_id
    attributes: dict[str, Any] = dict(smtp.attributes or {})
    assert attributes["server.address"] == smtp_server.host
    assert attributes["server.port"] == smtp_server.port
    assert attributes["atrium.module"] == "billing"
    assert attributes["atrium.email.message_id"].endswith("@atrium.test>")
    assert "someone.private" not in repr(attributes)
    assert len(spans) == 2


async def test_a_failed_smtp_send_is_an_error_span_without_the_recipient(
        record: Callable[..., InMemorySpanExporter]) -> None:
    exporter = record()
    sender = SmtpEmailSender("127.0.0.1", free_port(), "no-reply@atrium.test", timeout=2)

    with tracing.tracer("test").start_as_current_span("job", kind=SpanKind.CONSUMER), \
            pytest.raises(EmailDeliveryError):
        await sender.send(EmailMessage(to="someone.private@example.com", subject="s", body="b"))

    smtp = by_name(exporter.get_finished_spans(), "SMTP send")
    assert smtp.status.is_ok is False
    assert (smtp.attributes or {})["error.type"] == "ConnectionRefusedError"
    assert "someone.private" not in repr(smtp.attributes) + repr(smtp.events) + repr(smtp.status)


# --- the fast path's Redis connection --------------------------------------------------------------


async def test_a_command_on_the_fast_paths_redis_connection_is_a_client_span(
        record: Callable[..., InMemorySpanExporter]) -> None:
    """The redis instrumentation wraps redis-py's client, which this connection bypasses."""
    from core.fastpath.redis import PipelinedConnection

    require("redis")
    exporter = record()
    connection = PipelinedConnection("127.0.0.1", 6379)
    try:
        assert await connection.execute("PING") == b"PONG"  # no current span: no trace of its own
        with tracing.module_scope("items"), tracing.tracer("test").start_as_current_span("GET /x"):
            assert await connection.execute("MGET", "atrium-test:none", "atrium-test:nil") == [None, None]
    finally:
        await connection.aclose()

    spans = exporter.get_finished_spans()
    command = by_name(spans, "MGET")
    assert command.kind is SpanKind.CLIENT
    assert dict(command.attributes or {}) == {
        "db.system": "redis", "db.statement": "MGET ? ?", "db.redis.database_index": 0,
        "db.redis.args_length": 3, "net.peer.name": "127.0.0.1", "net.peer.port": 6379,
        "atrium.module": "items",
    }
    assert [s.name for s in spans] == ["MGET", "GET /x"]


# --- sampling at the edge: an unsampled request runs untraced ------------------------------------

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(("value", "parsed"), [
    (f"00-{TRACE_ID}-{PARENT_ID}-01", (int(TRACE_ID, 16), True)),
    (f"00-{TRACE_ID}-{PARENT_ID}-00", (int(TRACE_ID, 16), False)),
    (f" 00-{TRACE_ID}-{PARENT_ID}-03 ", (int(TRACE_ID, 16), True)),  # other flags, spaces around
    (f"01-{TRACE_ID}-{PARENT_ID}-01-future", (int(TRACE_ID, 16), True)),  # a later version may add
    (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 may not
    (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),
    (f"00-{'0' * 32}-{PARENT_ID}-01", None),
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),
    (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),
    (f"00-{TRACE_ID}-{PARENT_ID}", None),
    ("garbage", None),
])
def test_a_traceparent_is_read_as_the_w3c_propagator_reads_it(value: str,
                                                                parsed: tuple[int, bool] | None) -> None:
    assert tracing.parse_traceparent(value.encode()) == parsed


def request_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


def test_the_edge_follows_the_callers_decision_and_samples_new_traces_at_the_ratio(
        record: Callable[..., InMemorySpanExporter]) -> None:
    record(ratio=0.25)
    sampled = request_scope((b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode()))
    assert tracing.skip_request(sampled) is False
    assert tracing.UNSAMPLED not in sampled
    declined = request_scope((b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00".encode()))
    assert tracing.skip_request(declined) is True
    assert declined[tracing.UNSAMPLED] == int(TRACE_ID, 16)  # the caller's trace goes on, unrecorded

    new = [request_scope((b"traceparent", b"not-a-traceparent")) for _ in range(2000)]
    skipped = [scope for scope in new if tracing.skip_request(scope)]
    assert 1300 < len(skipped) < 1700  # 75 % of 2,000, give or take 7 standard deviations
    assert all(scope[tracing.UNSAMPLED] != int(TRACE_ID, 16) for scope in skipped)
    assert len({scope[tracing.UNSAMPLED] for scope in skipped}) == len(skipped)  # a trace id each


def test_with_tracing_shut_down_the_edge_marks_nothing(record: Callable[..., InMemorySpanExporter]) -> None:
    record(ratio=1.0)
    tracing.shutdown_tracing()
    scope = request_scope()
    assert tracing.skip_request(scope) is True  # no SERVER span from a provider that drops all
    assert tracing.UNSAMPLED not in scope


async def test_an_unsampled_request_records_nothing_but_carries_its_trace_to_the_outbox(
        sqlite_url: str, record: Callable[..., InMemorySpanExporter]) -> None:
    from sqlalchemy import select

    from core.messaging.outbox import OutboxMessage

    exporter = record(ratio=0.0)
    app = create_app(app_settings(sqlite_url, otel_sampling_ratio=0.0))
    async with serve(app) as client:
        exporter.clear()
        declined = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
        first = await client.post("/api/v1/users", headers=declined, json=signup_body())
        second = await client.post("/api/v1/users", json=signup_body())
        assert (first.status_code, second.status_code) == (201, 201)
        async with app.state.container.sessions()() as session:
            rows = (await session.scalars(select(OutboxMessage).order_by(OutboxMessage.created_at))).all()

    assert exporter.get_finished_spans() == ()  # no SERVER span, no SQL span: nothing recorded
    assert len(rows) >= 2
    assert all(row.traceparent is not None for row in rows)
    parents = [row.traceparent or "" for row in rows]
    assert all(parent.endswith("-00") for parent in parents)  # the jobs are not sampled either
    assert any(parent.startswith(f"00-{TRACE_ID}-") for parent in parents)  # the caller's trace
    assert any(not parent.startswith(f"00-{TRACE_ID}-") for parent in parents)  # a trace of its own


@pytest.mark.parametrize("fast_path", [False, True])
async def test_an_engine_gets_one_set_of_tracing_listeners(
        tmp_path: Path, record: Callable[..., InMemorySpanExporter], fast_path: bool) -> None:
    """One tracer per engine: the instrumentation wraps both SQLAlchemy's async and sync
    constructors, and a second tracer would run every statement's and checkout's listeners twice."""
    from core.db.engine import create_engine

    record()
    urls = [f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", "postgresql+asyncpg://127.0.0.1/test"]
    for url in urls:  # made, never connected: the listeners are added at creation
        engine = create_engine(url, fast_path=fast_path)
        try:
            sync_engine = engine.sync_engine
            events = ((sync_engine.dispatch, ("before_cursor_execute", "after_cursor_execute")),
                      (sync_engine.pool.dispatch, ("checkout", "checkin", "connect")))
            per_event = {name: sum(map(tracing.is_instrumentation, getattr(dispatch, name)))
                         for dispatch, names in events for name in names}
            assert per_event == dict.fromkeys(per_event, 1), url
        finally:
            await engine.dispose()


async def test_the_fast_path_counts_the_tracing_listeners_only_in_a_traced_request(
        tmp_path: Path, record: Callable[..., InMemorySpanExporter]) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, use_span
    from sqlalchemy import event

    from core.db.engine import create_engine
    from core.fastpath.transactions import observed

    record()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'observed.db'}")  # instrumented
    try:
        sync_engine = engine.sync_engine
        assert sync_engine.dispatch.before_cursor_execute  # the instrumentation listens
        unsampled = NonRecordingSpan(SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), False,
                                                 TraceFlags(TraceFlags.DEFAULT)))
        assert observed(sync_engine) is False  # no span: its listeners would make none
        with use_span(unsampled):
            assert observed(sync_engine) is False
        with tracing.tracer("test").start_as_current_span("GET /x", kind=SpanKind.SERVER):
            assert observed(sync_engine) is True

        def log_statement(*args: Any) -> None:
            return None

        event.listen(sync_engine, "after_cursor_execute", log_statement)
        assert observed(sync_engine) is True  # anyone else listening: always
    finally:
        await engine.dispose()


def test_a_job_whose_context_is_not_sampled_runs_with_the_instrumentations_suppressed(
        record: Callable[..., InMemorySpanExporter]) -> None:
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from core.messaging.queue import messaging_span

    exporter = record()
    seen = {}
    for flags in ("00", "01"):
        carrier = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-{flags}"}
        with messaging_span("probe.works process", "CONSUMER", "probe", carrier, {}):
            seen[flags] = (is_instrumentation_enabled(), tracing.recording())

    assert seen == {"00": (False, False), "01": (True, True)}
    assert [s.name for s in exporter.get_finished_spans()] == ["probe.works process"]
