"""Prometheus metrics: HTTP requests, jobs, the outbox and the database pool, on ``/metrics``.

**One process** (development, tests, ``atrium serve`` with one worker, ``atrium worker``): each
container owns a ``CollectorRegistry`` (with the process and GC collectors added back), so several
apps in one process - tests build many - never collide on metric names, and module metrics (cache
lookups, jobs) land on the same page as the HTTP ones.

**Several processes** (``atrium serve --workers N``): prometheus_client's multiprocess mode.
``prepare_serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a directory cleaned of the previous run's
files *before* uvicorn spawns the workers, which inherit it. Every value is then kept in a
per-process mmap file in that directory and ``/metrics``, whichever worker answers, merges all the
files with ``MultiProcessCollector``. prometheus_client chooses where values live (memory or file)
from that variable when it is *imported*; ``multiprocess_dir()`` re-reads it whenever a registry is
made and makes prometheus_client agree, so the mode follows the environment at app creation, not
at import. Gauges say how processes combine (``multiprocess_mode``); custom collectors and the
process/GC collectors cannot be merged and are left out in this mode.

HTTP metrics are recorded by a pure ASGI middleware on prometheus_client directly:
``http_requests_total{handler,method,status}`` and ``http_request_duration_seconds{handler,method}``.
The handler is the route template, read from the scope after the router matched it (no second
route match, unlike prometheus-fastapi-instrumentator, which this replaced for that per-request
cost); only a request answered before routing (a 429) or by no route pays for a match.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from loguru import logger
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The files prometheus_client writes in multiprocess mode: counter_<pid>.db, gauge_livesum_<pid>.db, ...
# Only these are removed when a directory is cleaned, whatever else it holds.
_METRIC_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_\d+\.db$")
EXCLUDED_HANDLERS = frozenset({"/metrics", "/health/live", "/health/ready"})
JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# One multiprocess value class per directory for the life of the process: two classes writing the
# same <kind>_<pid>.db file would overwrite each other's entries.
_multiprocess_values: dict[str, Any] = {}
if values.ValueClass is not values.MutexValue and os.environ.get(MULTIPROC_ENV):
    _multiprocess_values[os.environ[MULTIPROC_ENV]] = values.ValueClass


# --- single process or several ----------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process records into now, or None (in-memory registries).

    Follows ``PROMETHEUS_MULTIPROC_DIR`` as it is *now* and sets prometheus_client's value class to
    match, so metrics created from here on live in files exactly when the variable is set.
    """
    path = os.environ.get(MULTIPROC_ENV) or None
    if path is None:
        if values.ValueClass is not values.MutexValue:
            values.ValueClass = values.MutexValue
        return None
    if not os.path.isdir(path):
        raise RuntimeError(f"{MULTIPROC_ENV}={path!r} is not a directory")
    value_class = _multiprocess_values.get(path)
    if value_class is None:
        value_class = _multiprocess_values[path] = values.MultiProcessValue()
    if values.ValueClass is not value_class:
        values.ValueClass = value_class
    return path


def default_multiprocess_dir(port: int) -> Path:
    """Private to the user and the port, so two servers on one machine never merge or clean each other."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"atrium-metrics-{uid}-{port}"


def clean_multiprocess_dir(path: Path) -> int:
    """Create ``path`` (mode 0700) or remove the metric files a previous run left in it; returns how many."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = 0
    for entry in path.iterdir():
        if _METRIC_FILE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def prepare_serve(workers: int, directory: str, port: int) -> Path | None:
    """Choose the metrics mode for ``atrium serve`` before uvicorn starts any worker.

    Several workers: a cleaned multiprocess directory (``directory`` or a private default) exported
    in ``PROMETHEUS_MULTIPROC_DIR`` for the workers to inherit; stale files would double-count. One
    worker: in-memory registries, whatever the environment said.
    """
    if workers <= 1:
        disable_multiprocess()
        return None
    path = Path(directory) if directory else default_multiprocess_dir(port)
    clean_multiprocess_dir(path)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def disable_multiprocess() -> None:
    """In-memory registries for this process (``atrium worker`` exports its own metrics)."""
    os.environ.pop(MULTIPROC_ENV, None)
    multiprocess_dir()


def new_registry() -> CollectorRegistry:
    """A container's registry; also settles the mode (see ``multiprocess_dir``) before any metric exists."""
    registry = CollectorRegistry(auto_describe=True)
    if multiprocess_dir() is None:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def merged_exposition(path: str) -> bytes:
    """Multiprocess mode: the text exposition of every process's files in ``path``, merged."""
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=path)
    return generate_latest(merged)


# --- HTTP -------------------------------------------------------------------------------------


def route_template(scope: Scope) -> str | None:
    """The path template of the route that handled the request (None when no route matched).

    Read after the call: the router stores what it matched in the scope. Routes included with
    ``include_router`` keep their full (prefixed) template in FastAPI's effective route context.
    """
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    route = context if context is not None else scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def match_template(scope: Scope) -> str | None:
    """The template of the route that *would* handle the request, by matching the app's routes.

    Only for requests answered before the router ran (a rate-limit 429) or that matched nothing:
    a full route match, the cost the hot path avoids by reading ``route_template``.
    """
    if "app" not in scope:
        return None
    return get_route_name(HTTPConnection(scope), should_include_root_path=False)


class HttpMetrics:
    """The HTTP request counter and latency histogram, with the labelled children cached."""

    def __init__(self, registry: CollectorRegistry, excluded: Iterable[str] = EXCLUDED_HANDLERS) -> None:
        self.requests = Counter(
            "http_requests", "HTTP requests by route template, method and status.",
            ["handler", "method", "status"], registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds", "HTTP request latency by route template and method.",
            ["handler", "method"], registry=registry,
        )
        self.excluded = frozenset(excluded)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        handler = route_template(scope) or match_template(scope)
        if handler is None or handler in self.excluded:
            return  # unmatched paths would make one series per scanned URL
        key = (handler, scope["method"], status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(handler, key[1], str(status)),
                self.duration.labels(handler, key[1]),
            )
        children[0].inc()
        children[1].observe(seconds)


class WorkerLifecycle:
    """Multiprocess mode, around a uvicorn worker's life: sample the pool every few seconds; at the
    end drop this process's live gauges (pool, outbox lag) so the merge forgets them."""

    def __init__(self, path: str, pool: DbPoolMetrics | None) -> None:
        self.path = path
        self.pool = pool
        self._sampler: asyncio.Task[None] | None = None

    def started(self) -> None:
        if self.pool is not None:
            self._sampler = asyncio.create_task(self.pool.sample_forever(), name="metrics-pool-sampler")

    async def stopping(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        multiprocess.mark_process_dead(os.getpid(), self.path)


class HttpMetricsMiddleware:
    """Pure ASGI: times each HTTP request and records it once the response is done.

    On the lifespan scope (a real server) it also drives ``lifecycle``. Its end runs *before*
    ``lifespan.shutdown.complete`` is passed on: uvicorn may end the process right after it.
    """

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics,
                 lifecycle: WorkerLifecycle | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.lifecycle is not None:
                await self.app(scope, receive, self._lifespan_send(send))
                return
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - started)

    def _lifespan_send(self, send: Send) -> Send:
        lifecycle = self.lifecycle
        assert lifecycle is not None

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                lifecycle.started()
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await lifecycle.stopping()
            await send(message)

        return lifespan_send


# --- the database pool --------------------------------------------------------------------------


class DbPoolMetrics:
    """``atrium_db_pool_connections{state="in_use"|"idle"}`` and ``atrium_db_pool_max_connections``.

    Read from the SQLAlchemy pool, never per request. One process: a collector, read at scrape
    time. Several: the worker answering a scrape cannot see the others' pools, so every worker
    copies its figures into ``livesum`` gauges (summed over the live workers) every ``interval``
    seconds and right before it answers a scrape.
    """

    _HELP = "Database connections of the pool by state (checked out by a request or job, or idle)."
    _LIMIT_HELP = "The most connections the pool may open (pool size + max overflow)."

    def __init__(self, engine: Any, registry: CollectorRegistry, *, limit: int | None = None,
                 interval: float = 5.0) -> None:
        self._engine = engine  # an AsyncEngine (or anything with ``.pool``)
        self._limit = limit  # pool size + max overflow, as configured; None: the pool's size
        self.interval = interval
        self._gauges: tuple[Any, Any, Any] | None = None
        if multiprocess_dir() is None:
            registry.register(self)
        else:
            connections = Gauge("atrium_db_pool_connections", self._HELP, ["state"], registry=registry,
                                multiprocess_mode="livesum")
            max_connections = Gauge("atrium_db_pool_max_connections", self._LIMIT_HELP, registry=registry,
                                    multiprocess_mode="livesum")
            self._gauges = (connections.labels("in_use"), connections.labels("idle"), max_connections)

    def read(self) -> tuple[int, int, int] | None:
        """(in use, idle, limit); None for a pool that keeps no counts (NullPool, StaticPool)."""
        pool = self._engine.pool
        try:
            in_use, idle, size = int(pool.checkedout()), int(pool.checkedin()), int(pool.size())
        except (AttributeError, NotImplementedError):
            return None
        return in_use, idle, size if self._limit is None else self._limit

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("atrium_db_pool_connections", self._HELP, labels=["state"])
        yield GaugeMetricFamily("atrium_db_pool_max_connections", self._LIMIT_HELP)

    def collect(self) -> Iterator[Metric]:
        figures = self.read()
        if figures is None:
            return
        in_use, idle, limit = figures
        connections = GaugeMetricFamily("atrium_db_pool_connections", self._HELP, labels=["state"])
        connections.add_metric(["in_use"], in_use)
        connections.add_metric(["idle"], idle)
        yield connections
        yield GaugeMetricFamily("atrium_db_pool_max_connections", self._LIMIT_HELP, value=limit)

    def sample(self) -> None:
        """Multiprocess mode: copy the pool's figures into this process's gauge file."""
        if self._gauges is None:
            return
        figures = self.read()
        if figures is not None:
            for gauge, value in zip(self._gauges, figures, strict=True):
                gauge.set(value)

    async def sample_forever(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # metrics never take the process down
                logger.warning("metrics: sampling the database pool failed: {}", exc)
            await asyncio.sleep(self.interval)


# --- jobs and the outbox --------------------------------------------------------------------------


class JobMetrics:
    """Per task: messages processed, failed attempts, the failures dramatiq retries, and durations;
    per module, the integration events its handlers consumed.

    ``failed`` counts every failed attempt, ``retried`` those dramatiq will run again: what was
    dead-lettered is ``failed - retried``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.processed = Counter("atrium_jobs_processed", "Job messages handled successfully "
                                 "(a redelivered duplicate is a counted no-op).", ["task"], registry=registry)
        self.failed = Counter("atrium_jobs_failed", "Job attempts that raised.", ["task"], registry=registry)
        self.retried = Counter("atrium_jobs_retried", "Failed job attempts that dramatiq will retry.",
                               ["task"], registry=registry)
        self.duration = Histogram("atrium_job_duration_seconds", "Time a job attempt took, success or "
                                  "failure.", ["task"], buckets=JOB_BUCKETS, registry=registry)
        self.redeliveries = Counter("atrium_jobs_redelivered", "Job messages delivered again after a worker "
                                    "was given them and died without acknowledging them.", ["task"],
                                    registry=registry)
        # Per module (deliverable 3 of issue 17): integration events handled by a module's task.
        self.events_consumed = Counter("atrium_events_consumed", "Integration event messages a module's "
                                       "handler task processed.", ["module", "task"], registry=registry)

    def succeeded(self, task: str, seconds: float) -> None:
        self.processed.labels(task).inc()
        self.duration.labels(task).observe(seconds)

    def redelivered(self, task: str) -> None:
        self.redeliveries.labels(task).inc()

    def event_consumed(self, module: str, task: str) -> None:
        self.events_consumed.labels(module, task).inc()

    def failed_attempt(self, task: str, seconds: float, *, will_retry: bool) -> None:
        self.failed.labels(task).inc()
        if will_retry:
            self.retried.labels(task).inc()
        self.duration.labels(task).observe(seconds)


class OutboxMetrics:
    """The relay's lag (age of the oldest row waiting to be sent), the rows it published and, per
    module, the integration events among them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge("atrium_outbox_lag_seconds", "Age of the oldest unpublished, unparked outbox row at "
                         "the relay's last pass (0 when none waits).", registry=registry,
                         multiprocess_mode="livemax")
        self.published = Counter("atrium_outbox_published", "Outbox rows sent to the broker.",
                                 registry=registry)
        # Per module (deliverable 3 of issue 17): the module whose transaction wrote the event.
        self.events_published = Counter("atrium_events_published", "Integration events sent to the "
                                        "broker, by the module that emitted them.", ["module", "event"],
                                        registry=registry)

        # The publication registry's resubmitter (core.messaging.resubmit): messages sent again because
        # their job had not completed in time; worker only, plus `atrium outbox resubmit` (not exported).
        self.resubmitted = Counter("atrium_events_resubmitted", "Outbox messages sent to the broker again "
                                   "because their job had not completed (the publication registry).",
                                   ["task"], registry=registry)

    def event_published(self, module: str, event: str) -> None:
        self.events_published.labels(module, event).inc()

    def event_resubmitted(self, task: str) -> None:
        self.resubmitted.labels(task).inc()


# --- wiring ---------------------------------------------------------------------------------------


def install_metrics(app: FastAPI, registry: CollectorRegistry, *, pool: DbPoolMetrics | None = None
                    ) -> CollectorRegistry:
    """Record HTTP metrics (middleware added here: call it where the middleware belongs in the stack)
    and serve ``/metrics``."""
    http = HttpMetrics(registry)
    path = multiprocess_dir()

    async def metrics_endpoint(request: Request) -> Response:
        if path is None:
            body = generate_latest(registry)
        else:
            if pool is not None:
                pool.sample()  # this worker's figures are fresh; the others' at most ``interval`` old
            body = await asyncio.to_thread(merged_exposition, path)  # reads every worker's files
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    lifecycle = None
    if path is not None:
        logger.info("metrics: process {} records into {} (multiprocess mode)", os.getpid(), path)
        lifecycle = WorkerLifecycle(path, pool)

    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(HttpMetricsMiddleware, metrics=http, lifecycle=lifecycle)
    app.state.metrics_registry = registry
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None] | None:
    """Serve ``registry`` over HTTP on ``host:port`` (a daemon thread); returns how to stop it.

    None when ``port`` is 0 (off) or taken: exporting metrics never keeps the jobs from running,
    the failure is logged instead.
    """
    if not port:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        logger.error("metrics: cannot serve on {}:{} ({}); the worker runs without /metrics", host, port, exc)
        return None
    logger.info("metrics: serving on http://{}:{}/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
