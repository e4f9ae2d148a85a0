"""OpenTelemetry tracing: off unless ``ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT`` names a collector.

Off, this module is all there is: ``configure_tracing`` returns at once and nothing of the
OpenTelemetry SDK or of the instrumentations is imported (tests/unit/test_tracing.py checks
``sys.modules`` in a fresh process). The OpenTelemetry *API* is imported anyway, by FastAPI.

On, one ``TracerProvider`` per process (the API allows one global provider per process) sends spans
in batches over OTLP/HTTP (protobuf) to ``<endpoint>/v1/traces``, and the official instrumentations
trace SQLAlchemy engines (those made from then on: ``core.db.engine`` calls
``create_async_engine`` through its module so the instrumentation's wrapper sees it), redis-py and
httpx. FastAPI's native telemetry makes the SERVER span of each request (``main.create_app``).

Sampling is decided once per trace and follows the trace. A request is sampled at the edge, before
FastAPI's telemetry starts its SERVER span (``skip_request``, its ``exclude`` hook): a W3C
``traceparent`` decides by its sampled flag, a request without one is sampled with probability
``ATRIUM_OTEL_SAMPLING_RATIO``. An unsampled request gets no SERVER span and runs as if tracing were
off (``UnsampledRequests``): the instrumentations are suppressed, the fast path takes its direct
paths (``recording``), and the current span is a non-recording one of its own trace id with the
sampled flag clear, so an outbox row it writes carries "not sampled" to the jobs. A job whose
carried context is unsampled runs the same way (``core.messaging.queue.messaging_span``).

Behind the edge the sampler is parent-based: a span with a sampled parent (a job's carried context)
is recorded; a root SERVER span is recorded (the edge sampled it); any other root span starts a
trace with probability ``ATRIUM_OTEL_SAMPLING_RATIO``, except a CLIENT span: the outbox relay's poll,
dramatiq's broker commands, a pool's ping. Those happen every second in every process and belong
to no request or job; they start no trace.

Every span carries ``atrium.module``: the module whose route or job is running (``module_scope``),
``core`` for the rest (health, metrics, the relay, 404s, the rate limiter that runs before routing),
stamped as the span starts. A request's SERVER span starts before the route is known; the route's
app (``scoped_app``, installed by ``main.create_app``) stamps its module on it as the route is
entered. A job enters ``module_scope(task.module)`` before it starts its CONSUMER span.

What other code uses: ``enabled()`` (a module-level flag: guard every tracing call on a hot path
with it), ``recording()`` (whether the current request or job is being traced),
``module_scope``, ``quiet()`` (background statements that must start no span), ``tracer(name)`` (a
tracer of this provider).

``shutdown_tracing`` flushes and stops the exporter and removes the instrumentations; a later
``configure_tracing`` (tests build many apps in one process) gives the same provider a new exporter
and sampler: the processor and the sampler installed on the provider are switchboards (``Hub``,
``Switch``) for that reason. The provider's resource (``service.name``, ``service.version``,
``atrium.process.kind``) is the first configuration's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Literal, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:  # the SDK is imported only when tracing is configured
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

Kind = Literal["api", "worker", "cli"]


class Settings(Protocol):
    """What tracing reads of ``config.Settings`` (core does not import config)."""

    @property
    def otel_exporter_otlp_endpoint(self) -> str: ...
    @property
    def otel_sampling_ratio(self) -> float: ...
    @property
    def otel_service_name(self) -> str: ...


MODULE_ATTRIBUTE = "atrium.module"
CORE = "core"  # atrium.module of spans outside any module's route or job
TRACES_PATH = "/v1/traces"
SERVICE_NAMES: dict[str, str] = {"api": "atrium-api", "worker": "atrium-worker", "cli": "atrium-cli"}

# The module whose route or job this context runs (``module_scope``); None: core.
current_module: ContextVar[str | None] = ContextVar("atrium_module", default=None)

_enabled = False  # True between configure_tracing (endpoint set) and shutdown_tracing
_provider: TracerProvider | None = None  # the process's global SDK provider, once installed
_hub: Any = None  # Hub: the provider's one span processor
_switch: Any = None  # Switch: the provider's sampler
_instrumented = False
_ratio = 1.0  # the share of new traces sampled (skip_request)
_suppress: Callable[[], Any] | None = None  # opentelemetry.instrumentation.utils.suppress_instrumentation

UNSAMPLED = "atrium.unsampled_trace_id"  # in an unsampled request's ASGI scope (skip_request)
# W3C trace-context: version-trace_id-parent_id-flags; a version other than 00 may append fields.
_TRACEPARENT = re.compile(rb"\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*")


def enabled() -> bool:
    """Whether spans are being recorded in this process: guard any tracing work on a hot path."""
    return _enabled


def recording() -> bool:
    """Whether the current request or job is traced: tracing is on and the current span records.
    False in an unsampled request or job, whose statements the fast path may send straight to the
    driver (no instrumentation would have made a span of them)."""
    return _enabled and trace.get_current_span().is_recording()


def parse_traceparent(value: bytes) -> tuple[int, bool] | None:
    """``(trace id, sampled)`` of a W3C ``traceparent`` header's value; None when it is not valid
    (the same rules as OpenTelemetry's propagator: version ff, or 00 with more fields, or a zero id)."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest) or int(span_id, 16) == 0:
        return None
    number = int(trace_id, 16)
    return (number, bool(int(flags, 16) & 1)) if number else None


def skip_request(scope: Any) -> bool:
    """FastAPI's telemetry ``exclude`` hook: True (no SERVER span) for a request not sampled.

    The request's ``traceparent`` decides by its sampled flag; without a valid one, a new trace is
    sampled with probability ``_ratio``. An unsampled request's trace id goes in its scope
    (``UNSAMPLED``) for ``UnsampledRequests``. Tracing shut down (a test's app after its lifespan):
    no span, nothing marked.
    """
    if not _enabled:
        return True
    parent = None
    for name, value in scope.get("headers") or ():
        if name == b"traceparent":
            parent = parse_traceparent(value)
            break  # the first one, as the propagator reads it
    if parent is not None:
        trace_id, sampled = parent
        if sampled:
            return False
    elif _ratio >= 1.0 or random.random() < _ratio:
        return False
    else:
        trace_id = random.getrandbits(128) or 1
    scope[UNSAMPLED] = trace_id
    return True


class UnsampledRequests:
    """Runs a request ``skip_request`` did not sample as if tracing were off, minus one thing: the
    current span is a non-recording span of the request's trace with the sampled flag clear, so the
    outbox rows it writes tell their jobs not to record either. The instrumentations are suppressed
    (they return at once) and ``recording()`` is False (the fast path's direct statements run).
    The outermost middleware, installed only when tracing is on (``main.create_app``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trace_id = scope.get(UNSAMPLED)
        if trace_id is None or _suppress is None:
            await self.app(scope, receive, send)
            return
        span = NonRecordingSpan(SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False,
                                            trace_flags=TraceFlags(TraceFlags.DEFAULT)))
        with _suppress():
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)


def is_instrumentation(listener: Any) -> bool:
    """Whether ``listener`` (an engine event's listener) is an OpenTelemetry instrumentation's."""
    return str(getattr(listener, "__module__", "")).startswith("opentelemetry.instrumentation.")


@contextmanager
def unsampled_scope() -> Iterator[None]:
    """Inside an unsampled job (its CONSUMER span does not record): the instrumentations are
    suppressed, as in an unsampled request."""
    if _suppress is None:
        yield
        return
    with _suppress():
        yield


@contextmanager
def module_scope(name: str) -> Iterator[None]:
    """Spans started inside carry ``atrium.module=<name>`` (a request's route, a job's task)."""
    token = current_module.set(name)
    try:
        yield
    finally:
        current_module.reset(token)


def scoped_app(app: ASGIApp, module: str) -> ASGIApp:
    """``app`` (a route's ASGI app) running in ``module_scope(module)``; the span current when it is
    entered (the request's SERVER span) is stamped with the module too. Installed only when tracing
    is on (``main.create_app``): off, routes keep their own app."""

    async def scoped(scope: Scope, receive: Receive, send: Send) -> None:
        if UNSAMPLED in scope:  # nothing of this request is recorded: no span to stamp
            await app(scope, receive, send)
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(MODULE_ATTRIBUTE, module)
        token = current_module.set(module)
        try:
            await app(scope, receive, send)
        finally:
            current_module.reset(token)

    return scoped


@contextmanager
def quiet() -> Iterator[None]:
    """No instrumentation spans inside (a background loop's housekeeping statements)."""
    if not _enabled:
        yield
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


def service_name(settings: Settings, kind: Kind) -> str:
    return settings.otel_service_name or SERVICE_NAMES[kind]


def configure_tracing(settings: Settings, kind: Kind, *, exporter: SpanExporter | None = None) -> None:
    """Start recording spans when ``ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT`` is set (else do nothing).

    Idempotent: while tracing runs a second call changes nothing. ``exporter`` replaces the OTLP
    exporter (tests: an in-memory one, exported synchronously as each span ends).
    """
    global _enabled, _ratio, _suppress
    if _enabled or (not settings.otel_exporter_otlp_endpoint and exporter is None):
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    _install(settings, kind)
    _instrument(True)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + TRACES_PATH
        processor: SpanProcessor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    else:
        processor = SimpleSpanProcessor(exporter)
    _switch.sampler = build_sampler(settings.otel_sampling_ratio)
    _ratio = settings.otel_sampling_ratio
    _suppress = suppress_instrumentation
    _hub.delegate = processor
    _enabled = True


def shutdown_tracing() -> None:
    """Export what is left and stop the exporter; nothing is recorded until the next configure."""
    global _enabled
    if not _enabled:
        return
    _enabled = False
    _switch.sampler = None  # drop everything from now on
    processor, _hub.delegate = _hub.delegate, None
    if processor is not None:
        processor.shutdown()  # flushes first
    _instrument(False)


def build_sampler(ratio: float) -> Sampler:
    """Parent-based; a root SERVER span always (the edge sampled it: ``skip_request``), a root CLIENT
    span never, any other root span at ``ratio`` (see the module's docstring)."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import SpanKind

    class RootSampler(Sampler):
        def __init__(self) -> None:
            self._ratio = TraceIdRatioBased(ratio)

        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: SpanKind | None = None, attributes: Any = None, links: Any = None,
                          trace_state: Any = None) -> SamplingResult:
            if kind is SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            if kind is SpanKind.SERVER:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
            return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                             trace_state)

        def get_description(self) -> str:
            return (f"AtriumRoot{{{self._ratio.get_description()}, root SERVER span sampled at the edge, "
                    "no root CLIENT span}}")

    return ParentBased(root=RootSampler())


def _install(settings: Settings, kind: Kind) -> None:
    """The global provider, once per process (its resource is the first configuration's)."""
    global _provider, _hub, _switch
    if _provider is not None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class Hub(SpanProcessor):
        """Stamps ``atrium.module`` on every span and hands it to the current processor."""

        def __init__(self) -> None:
            self.delegate: SpanProcessor | None = None

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            span.set_attribute(MODULE_ATTRIBUTE, current_module.get() or CORE)
            delegate = self.delegate
            if delegate is not None:
                delegate.on_start(span, parent_context)

        def on_end(self, span: Any) -> None:
            delegate = self.delegate
            if delegate is not None:
                delegate.on_end(span)

        def shutdown(self) -> None:
            delegate = self.delegate
            if delegate is not None:
                delegate.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            delegate = self.delegate
            return True if delegate is None else delegate.force_flush(timeout_millis)

    class Switch(Sampler):
        """The current sampler; none (after shutdown_tracing): nothing is recorded."""

        def __init__(self) -> None:
            self.sampler: Sampler | None = None

        def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                          attributes: Any = None, links: Any = None, trace_state: Any = None
                          ) -> SamplingResult:
            sampler = self.sampler
            if sampler is None:
                return SamplingResult(Decision.DROP)
            return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                         trace_state)

        def get_description(self) -> str:
            return "AtriumSwitch" if self.sampler is None else self.sampler.get_description()

    try:
        release = version("atrium")
    except PackageNotFoundError:
        release = "0+unknown"
    resource = Resource.create({
        "service.name": service_name(settings, kind),
        "service.version": release,
        "atrium.process.kind": kind,
    })
    _hub, _switch = Hub(), Switch()
    provider = TracerProvider(sampler=_switch, resource=resource)
    provider.add_span_processor(_hub)
    trace.set_tracer_provider(provider)  # refused (with a warning) if another was set first
    _provider = provider


def _instrument(on: bool) -> None:
    """Install (or remove) the instrumentations, globally: the engines made from now on
    (core.db.engine), every redis-py client, every httpx client. Removed by ``shutdown_tracing`` so
    that a process (a test run) goes back to untraced engines: an observed engine turns the fast
    path's direct statements off (core.fastpath.transactions.observed)."""
    global _instrumented
    if on == _instrumented:
        return
    _instrumented = on
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    if not on:
        for instrumentor in (SQLAlchemyInstrumentor(), RedisInstrumentor(), HTTPXClientInstrumentor()):
            instrumentor.uninstrument()
        return
    # Its declared range stops below SQLAlchemy 2.1, with which it works unchanged (it listens to
    # the public engine events; tests/unit/test_tracing.py sees the statements' spans): without
    # skip_dep_check it would instrument nothing and say so in one log line.
    SQLAlchemyInstrumentor().instrument(tracer_provider=_provider, skip_dep_check=True)
    RedisInstrumentor().instrument(tracer_provider=_provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=_provider)


def provider() -> trace.TracerProvider | None:
    """The provider ``configure_tracing`` installed (None before): FastAPI and the instrumentations
    are given it explicitly, so they agree even where another global provider was set first."""
    return _provider


def tracer(name: str) -> trace.Tracer:
    """A tracer of Atrium's provider (the global one's before configure_tracing: a no-op while off)."""
    return trace.get_tracer(name) if _provider is None else _provider.get_tracer(name)
