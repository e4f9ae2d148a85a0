"""Metrics as deployed: ``atrium serve --workers 2`` (multiprocess), ``atrium worker``'s own port, and
the in-process development worker, each scraped over HTTP like Prometheus would."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from main import create_app
from tests.support.api import signup_body
from tests.support.db import migrated
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, TEST_SECRET, make_settings
from tests.support.smtp import SmtpServer, free_port
from tests.support.stack import serve
from tests.support.waiting import eventually
from tests.support.worker import as_environment, start_worker, stop_worker, wait_until_started

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ME = "/api/v1/users/me"
WELCOME = "users.send_welcome_email"


def values_of(text: str, name: str, **labels: str) -> list[float]:
    """Every sample ``name`` whose labels include ``labels``."""
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(values_of(text, name, **labels))


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:  # a new connection: any worker may answer
        response = await client.get(url)
    assert response.status_code == 200, response.text
    return response.text


# --- atrium serve --workers 2 ----------------------------------------------------------------------


class Serve:
    """``atrium serve --workers 2`` on a free port, test profile, a migrated SQLite file."""

    def __init__(self, tmp: Path, metrics_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.env = as_environment({
            "env": "test", "secret_key": TEST_SECRET, "database_url": f"sqlite+aiosqlite:///{tmp / 'api.db'}",
            "auto_migrate": False, "log_level": "INFO", "metrics_multiproc_dir": metrics_dir,
            "rate_limit_backend": "none", **CHEAP_HASHING,
        })
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        subprocess.run([sys.executable, "-m", "main", "migrate"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True, timeout=120)

    def spawn(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "main", "serve", "--workers", "2", "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )

    async def start(self) -> None:
        self.spawn()
        # Both workers up, so requests and scrapes can land on either.
        await eventually(self._both_workers_started, within=60)

    def _both_workers_started(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"atrium serve exited:\n{self.log_tail()}")
        return self.log.read_text(errors="replace").count("Application startup complete") >= 2

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def serving(serve: Serve) -> Iterator[Serve]:
    try:
        yield serve
    finally:
        if serve.process is not None and serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait()


async def send_requests(base: str, count: int) -> None:
    """``count`` counted requests (and some that are not), each on its own connection, 8 at a time."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        gate = asyncio.Semaphore(8)

        async def one(path: str, expected: int) -> None:
            async with gate:
                response = await client.get(path)
            assert response.status_code == expected, response.text

        await asyncio.gather(*(one(ME, 401) for _ in range(count)))
        await asyncio.gather(one("/api/v1/no/such/route", 404), one("/health/live", 200))


def counted_by_process(metrics_dir: Path) -> dict[int, float]:
    """Requests to ``ME`` per worker, read from each worker's own counter file."""
    per_pid: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)])
        per_pid[int(path.stem.split("_")[-1])] = sum(
            s.value for m in merged for s in m.samples
            if s.name == "http_requests_total" and s.labels.get("handler") == ME
        )
    return per_pid


def plant_stale_file(metrics_dir: Path, count: float) -> Path:
    """A counter file as a worker of an earlier run would have left it."""
    path = metrics_dir / "counter_4242424.db"
    stale = MmapedDict(str(path))
    stale.write_value(
        mmap_key("http_requests", "http_requests_total", ["handler", "method", "status"], [ME, "GET", "401"],
                 "HTTP requests by route template, method and status."),
        count, 0.0,
    )
    stale.close()
    return path


async def test_serve_with_two_workers_reports_the_sum_of_both_and_a_restart_starts_from_zero(
    tmp_path: Path,
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    stale = plant_stale_file(metrics_dir, 1000)
    (metrics_dir / "keep.txt").write_text("not a metrics file")

    serve = Serve(tmp_path, metrics_dir)
    serve.migrate()
    with serving(serve):
        await serve.start()
        assert not stale.exists()  # cleaned before the workers started
        assert (metrics_dir / "keep.txt").exists()

        sent = 0
        while sent < 200:  # until both workers have answered some (the kernel picks; usually at once)
            await send_requests(serve.base, 20)
            sent += 20
            per_pid = counted_by_process(metrics_dir)
            if len(per_pid) == 2 and min(per_pid.values()) > 0:
                break
        assert len(per_pid) == 2, per_pid  # one file per worker
        assert min(per_pid.values()) > 0, per_pid  # and both answered requests
        assert sum(per_pid.values()) == sent
        for _ in range(6):  # fresh connections: whichever worker answers reports the sum
            text = await scrape(serve.base + "/metrics")
            assert total(text, "http_requests_total", handler=ME) == sent, serve.log_tail()
            assert total(text, "http_request_duration_seconds_count", handler=ME) == sent
            assert values_of(text, "http_requests_total", handler="/metrics") == []
            assert "process_cpu_seconds_total" not in text  # per-process figures cannot be merged
            assert values_of(text, "atrium_db_pool_max_connections")  # summed over the workers
        assert serve.stop() == 0, serve.log_tail()
    first_run = set(counted_by_process(metrics_dir))
    assert not list(metrics_dir.glob("gauge_live*.db"))  # stopped workers drop their live gauges

    again = Serve(tmp_path, metrics_dir)
    with serving(again):
        await again.start()
        await send_requests(again.base, 7)
        for _ in range(3):
            text = await scrape(again.base + "/metrics")
            assert total(text, "http_requests_total", handler=ME) == 7, again.log_tail()
        assert first_run.isdisjoint(counted_by_process(metrics_dir))  # the first run's files are gone
        assert again.stop() == 0, again.log_tail()


# --- atrium worker ---------------------------------------------------------------------------------


@asynccontextmanager
async def production_worker(
    pg_database_factory: Callable[[], Any], tmp_path: Path, smtp: SmtpServer, **extra: Any
) -> AsyncIterator[tuple[dict[str, Any], str]]:
    """A production-like ``atrium worker`` (PostgreSQL, Redis broker, SMTP) with its metrics port."""
    require("postgres")
    require("redis")
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    values: dict[str, Any] = {
        "env": "production", "modules": ("users",), "secret_key": TEST_SECRET,
        "database_url": await migrated(await pg_database_factory()),
        "cache_backend": "redis", "redis_url": REDIS_URL, "cache_namespace": namespace,
        "broker_backend": "redis", "broker_url": REDIS_URL, "broker_namespace": namespace,
        "email_backend": "smtp", "smtp_host": smtp.host, "smtp_port": smtp.port,
        "outbox_poll_interval": 0.2, "worker_metrics_port": port,
        "log_level": "INFO", "log_json": True, **CHEAP_HASHING, **extra,
    }
    log_path = tmp_path / "worker.log"
    worker = start_worker(values, log_path)
    try:
        await wait_until_started(worker, log_path)
        yield values, f"http://127.0.0.1:{port}/metrics"
    finally:
        code = stop_worker(worker)
        await flush_redis_namespace(namespace)
    assert code == 0, f"worker exited with {code}:\n{log_path.read_text()[-3000:]}"


@pytest.mark.postgres
@pytest.mark.redis
async def test_the_worker_serves_job_outbox_and_pool_metrics_on_its_own_port(
    pg_database_factory: Callable[[], Any], tmp_path: Path
) -> None:
    with SmtpServer() as smtp:
        # The API only writes the outbox; the worker's relay publishes and its actors run the job.
        async with production_worker(pg_database_factory, tmp_path, smtp, relay_outbox_in_api=False) as (
            values, metrics_url,
        ):
            text = await scrape(metrics_url)
            assert values_of(text, "atrium_jobs_processed_total") == []  # nothing ran yet
            assert values_of(text, "atrium_outbox_lag_seconds") == [0.0]
            assert "process_cpu_seconds_total" in text  # one process: its own figures too

            app = create_app(Settings(**{**values, "log_level": "WARNING"}))
            async with serve(app) as client:
                body = signup_body()
                assert (await client.post("/api/v1/users", json=body)).status_code == 201
                await smtp.wait_for(body["email"])
                api_text = (await client.get("/metrics")).text

            async def job_recorded() -> bool:
                return total(await scrape(metrics_url), "atrium_jobs_processed_total", task=WELCOME) == 1

            await eventually(job_recorded)
            text = await scrape(metrics_url)

    assert total(text, "atrium_job_duration_seconds_count", task=WELCOME) == 1
    assert total(text, "atrium_job_duration_seconds_sum", task=WELCOME) > 0
    assert total(text, "atrium_jobs_failed_total", task=WELCOME) == 0
    assert total(text, "atrium_jobs_retried_total", task=WELCOME) == 0
    assert total(text, "atrium_outbox_published_total") == 1  # the UserRegistered row
    assert values_of(text, "atrium_outbox_lag_seconds") == [0.0]
    [idle], [in_use] = (values_of(text, "atrium_db_pool_connections", state=s) for s in ("idle", "in_use"))
    assert idle + in_use >= 1  # the relay polls every 0.2 s: a connection may be checked out right now
    assert values_of(text, "atrium_db_pool_max_connections") == [10 + 10]  # pool size + overflow
    # The API (no in-process worker in production) has no job figures of its own.
    assert values_of(api_text, "atrium_jobs_processed_total") == []


# --- the in-process development worker -------------------------------------------------------------


async def test_the_in_process_worker_records_its_jobs_on_the_app_metrics(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}", **CHEAP_HASHING)
    app = create_app(settings)
    sender = app.state.container.email_sender()
    async with serve(app) as client:
        body = signup_body()
        assert (await client.post("/api/v1/users", json=body)).status_code == 201
        await sender.wait_for(lambda m: m.to == body["email"], timeout=15)

        async def job_recorded() -> bool:
            text = (await client.get("/metrics")).text
            return total(text, "atrium_jobs_processed_total", task=WELCOME) == 1

        await eventually(job_recorded)
        text = (await client.get("/metrics")).text
    assert total(text, "atrium_job_duration_seconds_count", task=WELCOME) == 1
    assert total(text, "atrium_outbox_published_total") >= 1
    assert values_of(text, "atrium_db_pool_connections", state="in_use")

