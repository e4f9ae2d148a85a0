"""core.observability.metrics: HTTP recording, the pool collector, job and outbox metrics, multiprocess."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, Counter, values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.messaging.outbox import Inbox, Outbox, OutboxRelay
from core.messaging.queue import JobContext, JobRunner, LoopBridge, stub_broker, task
from core.observability import metrics
from tests.support.db import migrated

# --- helpers -------------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


async def eventually(check: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Refuse:
    """Answers /refused with a 429 before the router runs, as the rate limiter does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/things/refused"):
            await PlainTextResponse("slow down", status_code=429)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def files(path: Path, pattern: str) -> list[Path]:
    return list(path.glob(pattern))


def small_app(registry: CollectorRegistry) -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/things")

    @router.get("/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    @router.get("/boom/now")
    async def boom() -> None:
        raise RuntimeError("boom")

    api = APIRouter(prefix="/api")
    api.include_router(router)
    app.include_router(api)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(Refuse)
    metrics.install_metrics(app, registry)
    return app


@pytest.fixture(autouse=True)
def single_process() -> Iterator[None]:
    """Every test starts (and leaves) in one-process mode, whatever the environment says."""
    metrics.disable_multiprocess()
    yield
    metrics.disable_multiprocess()


@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process in multiprocess mode on a private directory, for one test."""
    path = tmp_path / "prom"
    path.mkdir()
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(path))
    yield path
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    metrics.disable_multiprocess()


# --- HTTP ------------------------------------------------------------------------------------------


class TestHttpMetrics:
    async def test_requests_are_counted_by_route_template_method_and_status(self) -> None:
        registry = metrics.new_registry()
        app = small_app(registry)
        async with client(app) as http:
            for n in (1, 2, 3):
                assert (await http.get(f"/api/things/{n}")).status_code == 200
            assert (await http.get("/api/things/not-a-number")).status_code == 422
            assert (await http.post("/api/things/1")).status_code == 405

        handler = "/api/things/{thing_id}"
        assert sample(registry, "http_requests_total", handler=handler, method="GET", status="200") == 3
        assert sample(registry, "http_requests_total", handler=handler, method="GET", status="422") == 1
        assert sample(registry, "http_requests_total", handler=handler, method="POST", status="405") == 1
        assert sample(registry, "http_request_duration_seconds_count", handler=handler, method="GET") == 4
        assert sample(registry, "http_request_duration_seconds_sum", handler=handler, method="GET") > 0

    async def test_unmatched_paths_metrics_and_health_are_not_recorded(self) -> None:
        registry = metrics.new_registry()
        app = small_app(registry)
        async with client(app) as http:
            assert (await http.get("/nowhere/12345")).status_code == 404
            assert (await http.get("/health/live")).status_code == 200
            response = await http.get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert samples(response.text, "http_requests_total") == {}
        assert "process_cpu_seconds_total" in response.text  # one process: the process collector is there

    async def test_a_response_given_before_routing_is_counted_under_its_route(self) -> None:
        registry = metrics.new_registry()
        app = small_app(registry)
        async with client(app) as http:
            assert (await http.get("/api/things/refused")).status_code == 429

        # Answered before the router ran: the template the router would have picked is reported.
        assert samples(generate(registry), "http_requests_total") == {
            (("handler", "/api/things/{thing_id}"), ("method", "GET"), ("status", "429")): 1.0
        }

    async def test_an_exception_escaping_the_app_is_a_500(self) -> None:
        registry = metrics.new_registry()
        app = small_app(registry)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/api/things/boom/now")).status_code == 500

        assert sample(registry, "http_requests_total", handler="/api/things/boom/now", method="GET",
                      status="500") == 1

    async def test_each_app_has_its_own_registry(self) -> None:
        first, second = metrics.new_registry(), metrics.new_registry()
        apps = small_app(first), small_app(second)
        for app, requests in zip(apps, (2, 5), strict=True):
            async with client(app) as http:
                for _ in range(requests):
                    await http.get("/api/things/7")
        labels = {"handler": "/api/things/{thing_id}", "method": "GET", "status": "200"}
        assert sample(first, "http_requests_total", **labels) == 2
        assert sample(second, "http_requests_total", **labels) == 5


def generate(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# --- multiprocess plumbing -------------------------------------------------------------------------


class TestMultiprocessMode:
    def test_the_mode_follows_the_environment_when_a_registry_is_made(
        self, multiprocess_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        registry = metrics.new_registry()
        assert values.ValueClass is not values.MutexValue
        assert metrics.multiprocess_dir() == str(multiprocess_dir)
        Counter("probe_things", "Things.", ["kind"], registry=registry).labels("a").inc(3)
        assert list(multiprocess_dir.glob("counter_*.db"))  # the value lives in this process's file
        assert registry.get_sample_value("process_cpu_seconds_total") is None  # not mergeable: left out

        merged = metrics.merged_exposition(str(multiprocess_dir)).decode()
        assert samples(merged, "probe_things_total") == {(("kind", "a"),): 3.0}

        monkeypatch.delenv(metrics.MULTIPROC_ENV)
        single = metrics.new_registry()
        assert values.ValueClass is values.MutexValue
        Counter("probe_things", "Things.", ["kind"], registry=single).labels("a").inc()
        assert single.get_sample_value("probe_things_total", {"kind": "a"}) == 1.0
        assert single.get_sample_value("process_cpu_seconds_total") is not None

    def test_the_merge_sums_the_files_of_every_process(self, multiprocess_dir: Path) -> None:
        registry = metrics.new_registry()
        http = metrics.HttpMetrics(registry)
        http.requests.labels("/a/{id}", "GET", "200").inc(2)
        # Another worker's file, as it would have written it.
        other = MmapedDict(str(multiprocess_dir / "counter_999999.db"))
        key = mmap_key("http_requests", "http_requests_total", ["handler", "method", "status"],
                       ["/a/{id}", "GET", "200"], "HTTP requests by route template, method and status.")
        other.write_value(key, 5.0, 0.0)
        other.close()

        merged = metrics.merged_exposition(str(multiprocess_dir)).decode()
        assert samples(merged, "http_requests_total") == {
            (("handler", "/a/{id}"), ("method", "GET"), ("status", "200")): 7.0
        }

    async def test_the_app_serves_the_merge_and_pool_gauges_summed(self, multiprocess_dir: Path) -> None:
        registry = metrics.new_registry()
        engine = create_engine(f"sqlite+aiosqlite:///{multiprocess_dir.parent / 'pool.db'}")
        pool = metrics.DbPoolMetrics(engine, registry)
        app = small_app_with_pool(registry, pool)
        try:
            async with engine.connect(), client(app) as c:
                await c.get("/api/things/1")
                text = (await c.get("/metrics")).text
        finally:
            await engine.dispose()

        assert samples(text, "http_requests_total") == {
            (("handler", "/api/things/{thing_id}"), ("method", "GET"), ("status", "200")): 1.0
        }
        assert samples(text, "atrium_db_pool_connections") == {(("state", "idle"),): 0.0,
                                                               (("state", "in_use"),): 1.0}
        assert files(multiprocess_dir, "gauge_livesum_*.db")

    async def test_a_worker_drops_its_live_gauges_when_its_lifespan_ends(
        self, multiprocess_dir: Path
    ) -> None:
        registry = metrics.new_registry()
        engine = create_engine(f"sqlite+aiosqlite:///{multiprocess_dir.parent / 'pool.db'}")
        app = small_app_with_pool(registry, metrics.DbPoolMetrics(engine, registry, interval=0.01))
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[str] = []

        async def send(message: Any) -> None:
            sent.append(message["type"])

        await queue.put({"type": "lifespan.startup"})
        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                           queue.get, send))
        try:
            await eventually(lambda: files(multiprocess_dir, "gauge_livesum_*.db"))  # sampled
            await queue.put({"type": "lifespan.shutdown"})
            await lifespan
        finally:
            await engine.dispose()
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert not files(multiprocess_dir, "gauge_live*_*.db")


def small_app_with_pool(registry: CollectorRegistry, pool: metrics.DbPoolMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/api/things/{thing_id}")
    async def get_thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    metrics.install_metrics(app, registry, pool=pool)
    return app


class TestServePreparation:
    def test_cleaning_removes_only_prometheus_files(self, tmp_path: Path) -> None:
        stale = ["counter_12.db", "histogram_12.db", "gauge_livesum_12.db", "gauge_all_3.db", "summary_9.db"]
        kept = ["atrium.db", "notes.txt", "counter_.db", "counter_12.db.bak"]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"x")

        assert metrics.clean_multiprocess_dir(tmp_path) == len(stale)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)

    def test_a_missing_directory_is_created_private(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b"
        assert metrics.clean_multiprocess_dir(path) == 0
        assert path.is_dir()
        assert path.stat().st_mode & 0o777 == 0o700

    def test_several_workers_get_a_cleaned_directory_in_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
        path = tmp_path / "shared"
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"old")
        try:
            assert metrics.prepare_serve(2, str(path), 8000) == path
            assert metrics.multiprocess_dir() == str(path)
            assert not (path / "counter_1.db").exists()
        finally:
            metrics.disable_multiprocess()

    def test_the_default_directory_is_per_user_and_port(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        try:
            path = metrics.prepare_serve(3, "", 8123)
        finally:
            metrics.disable_multiprocess()
        assert path is not None
        assert path.parent == tmp_path
        assert path.name.endswith("-8123")
        assert path.is_dir()

    def test_one_worker_means_in_memory_registries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
        assert metrics.prepare_serve(1, str(tmp_path), 8000) is None
        assert metrics.multiprocess_dir() is None
        assert values.ValueClass is values.MutexValue


# --- the database pool -----------------------------------------------------------------------------


class TestDbPoolMetrics:
    async def test_connections_in_use_and_idle_are_read_at_scrape_time(
        self, tmp_path: Path
    ) -> None:
        registry = metrics.new_registry()
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
        metrics.DbPoolMetrics(engine, registry, limit=5 + 10)  # as configured: size + overflow
        try:
            assert sample(registry, "atrium_db_pool_connections", state="in_use") == 0
            async with engine.connect(), engine.connect():
                assert sample(registry, "atrium_db_pool_connections", state="in_use") == 2
            assert sample(registry, "atrium_db_pool_connections", state="in_use") == 0
            assert sample(registry, "atrium_db_pool_connections", state="idle") == 2
            assert registry.get_sample_value("atrium_db_pool_max_connections") == 5 + 10
        finally:
            await engine.dispose()

    async def test_without_a_configured_limit_the_limit_is_the_pool_size(self, tmp_path: Path) -> None:
        registry = metrics.new_registry()
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
        metrics.DbPoolMetrics(engine, registry)
        try:
            async with engine.connect():
                pass
            assert registry.get_sample_value("atrium_db_pool_max_connections") == 5  # SQLAlchemy's size
        finally:
            await engine.dispose()

    async def test_a_pool_without_counts_exports_nothing(self, tmp_path: Path) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        registry = metrics.new_registry()
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", poolclass=NullPool)
        metrics.DbPoolMetrics(engine, registry)
        try:
            assert "atrium_db_pool" not in generate(registry)
        finally:
            await engine.dispose()

    def test_registering_does_not_touch_the_engine(self) -> None:
        class Untouchable:
            @property
            def pool(self) -> Any:
                raise AssertionError("read at registration")

        metrics.DbPoolMetrics(Untouchable(), metrics.new_registry())


# --- jobs --------------------------------------------------------------------------------------------


@task("probe.works")
async def works(ctx: JobContext, payload: dict[str, Any]) -> None:
    await asyncio.sleep(0.01)


@task("probe.breaks", max_retries=1)
async def breaks(ctx: JobContext, payload: dict[str, Any]) -> None:
    raise RuntimeError("always fails")


@pytest.fixture
async def jobs_db(tmp_path: Path) -> AsyncIterator[Any]:
    engine = create_engine(await migrated(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"))
    yield engine
    await engine.dispose()


class TestJobMetrics:
    async def test_processed_failed_retried_and_durations_per_task(self, jobs_db: Any) -> None:
        registry = metrics.new_registry()
        broker = stub_broker(max_retries=3, min_backoff_ms=10, max_backoff_ms=20, time_limit_ms=10_000)
        bridge = LoopBridge(asyncio.get_running_loop())
        runner = JobRunner(broker, session_factory(jobs_db), Inbox(), bridge, containers={"probe": object()},
                           tasks=[works, breaks], queue_prefix=f"m{uuid.uuid4().hex[:6]}.",
                           metrics=metrics.JobMetrics(registry))
        worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
        await asyncio.to_thread(worker.start)
        try:
            for name in ("probe.works", "probe.works", "probe.breaks"):
                broker.enqueue(dramatiq.Message(
                    queue_name=runner.queue_of(name), actor_name=name, args=(),
                    kwargs={"message_id": str(uuid.uuid4()), "request_id": "-", "payload": {}}, options={},
                ))
            await eventually(lambda: sample(registry, "atrium_jobs_failed_total", task="probe.breaks") == 2
                             and sample(registry, "atrium_jobs_processed_total", task="probe.works") == 2)
        finally:
            await asyncio.to_thread(worker.stop)

        assert sample(registry, "atrium_jobs_retried_total", task="probe.breaks") == 1  # then dead-lettered
        assert sample(registry, "atrium_jobs_processed_total", task="probe.breaks") == 0
        assert sample(registry, "atrium_jobs_failed_total", task="probe.works") == 0
        assert sample(registry, "atrium_job_duration_seconds_count", task="probe.works") == 2
        assert sample(registry, "atrium_job_duration_seconds_sum", task="probe.works") >= 0.02
        assert sample(registry, "atrium_job_duration_seconds_count", task="probe.breaks") == 2


# --- the outbox ----------------------------------------------------------------------------------------


class TestOutboxMetrics:
    async def test_published_rows_are_counted_and_the_lag_follows_the_oldest_waiting_row(
        self, jobs_db: Any
    ) -> None:
        registry = metrics.new_registry()
        sessions = session_factory(jobs_db)
        sent: list[Any] = []
        broker_up = False

        async def send(message: Any) -> None:
            if not broker_up:
                raise ConnectionError("broker down")
            sent.append(message)

        relay = OutboxRelay(sessions, send, {}, lambda name: "q", poll_interval=0.05,
                            metrics=metrics.OutboxMetrics(registry))
        assert await relay.oldest_waiting_age() == 0.0
        async with UnitOfWork(sessions) as session:
            for n in range(3):
                Outbox().enqueue(session, "probe.works", {"n": n})

        relay.start()
        try:
            await eventually(lambda: sample(registry, "atrium_outbox_lag_seconds") > 0.1)  # waiting, growing
            assert sample(registry, "atrium_outbox_published_total") == 0
            broker_up = True
            relay.kick()
            await eventually(lambda: len(sent) == 3 and sample(registry, "atrium_outbox_lag_seconds") == 0)
        finally:
            await relay.stop()
        assert sample(registry, "atrium_outbox_published_total") == 3
        assert await relay.oldest_waiting_age() == 0.0


# --- the worker's metrics server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestServeMetrics:
    def test_the_registry_is_served_over_http_until_stopped(self) -> None:
        registry = metrics.new_registry()
        metrics.JobMetrics(registry).succeeded("probe.works", 0.2)
        port = free_port()
        stop = metrics.serve_metrics(registry, "127.0.0.1", port)
        assert stop is not None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        finally:
            stop()
        assert samples(text, "atrium_jobs_processed_total") == {(("task", "probe.works"),): 1.0}
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)

    def test_port_zero_is_off_and_a_taken_port_is_not_fatal(self) -> None:
        registry = metrics.new_registry()
        assert metrics.serve_metrics(registry, "127.0.0.1", 0) is None
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            assert metrics.serve_metrics(registry, "127.0.0.1", taken.getsockname()[1]) is None


class TestSettings:
    def test_defaults_and_bounds(self) -> None:
        from config import ConfigError, load_settings
        from tests.support.settings import make_settings

        settings = make_settings()
        assert (settings.worker_metrics_host, settings.worker_metrics_port) == ("127.0.0.1", 9191)
        assert settings.metrics_multiproc_dir == ""
        assert make_settings(worker_metrics_port=0).worker_metrics_port == 0  # off
        with pytest.raises(ConfigError, match="ATRIUM_WORKER_METRICS_PORT"):
            load_settings(env="test", worker_metrics_port=70_000)
