"""Degradation and recovery: each fault is injected into a PRIVATE server, never a shared one.

- PostgreSQL restarted under load (``pg_ctl restart -m fast``, then a stop ... start with a gap):
  requests during the outage get a quick 503 envelope, the pool recovers without restarting the
  app, and every signup that was answered 201 exists afterwards (and got its welcome email).
- The Redis cache stopped: item reads bypass it (200), readiness names it; started again, it is
  used again.
- ``atrium serve`` on SIGTERM: in-flight requests finish with real answers, exit status 0.
- ``atrium worker`` on SIGTERM with a job in progress: it finishes the job and exits 0; nothing
  is lost.

The broker being down (events wait in the outbox and leave once it is back) is covered by
``test_billing_faults.py::test_a_payment_accepted_while_the_broker_is_down_...`` and
``test_degraded.py::TestBrokerDown``; the rate limiter without Redis by ``test_rate_limits.py``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core.db.session import UnitOfWork
from main import create_app
from tests.support.api import bearer, login
from tests.support.billing import customer_with_invoice, invoice_status, pay, payment_of, receipts
from tests.support.db import migrated
from tests.support.envelope import assert_envelope
from tests.support.pg_cluster import PgCluster, require_pg_cluster
from tests.support.production import private_production
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, make_settings
from tests.support.smtp import free_port
from tests.support.stack import serve
from tests.support.waiting import eventually, holds_for
from tests.support.worker import ROOT, as_environment

POOL_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0


async def create_admin(app: Any, client: httpx.AsyncClient) -> dict[str, str]:
    container = app.state.container
    email, password = f"admin-{uuid.uuid4().hex[:8]}@example.com", "admin password 123"
    async with UnitOfWork(container.sessions()) as session:
        await container.users.service().create_admin(session, email, password, "Root Admin")
    return bearer(await login(client, email, password))


# --- 1. PostgreSQL restarted under load ---------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    status: int
    code: str | None = None
    retry_after: str | None = None
    email: str | None = None

    @property
    def took(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """Loops of signups and catalog reads through the ASGI client until ``stop``."""

    client: httpx.AsyncClient
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def _signup(self) -> Outcome:
        email = f"load-{uuid.uuid4().hex[:12]}@example.com"
        started = time.monotonic()
        response = await self.client.post("/api/v1/users", json={
            "email": email, "password": "correct horse battery", "full_name": "Load", "age": 30})
        return self._outcome("signup", started, response, email)

    async def _read(self) -> Outcome:
        started = time.monotonic()
        return self._outcome("list_items", started, await self.client.get("/api/v1/items?limit=5"))

    @staticmethod
    def _outcome(kind: str, started: float, response: httpx.Response, email: str | None = None) -> Outcome:
        code = response.json()["error"]["code"] if response.status_code >= 400 else None
        return Outcome(kind, started, time.monotonic(), response.status_code, code,
                       response.headers.get("retry-after"), email)

    async def _loop(self, request: Callable[[], Awaitable[Outcome]]) -> None:
        while not self.stopping.is_set():
            outcome = await request()
            self.outcomes.append(outcome)
            if outcome.status >= 500:
                await asyncio.sleep(0.02)  # a client backing off a little, not a tight error loop

    def start(self, signups: int = 3, readers: int = 3) -> list[asyncio.Task[None]]:
        loops = [self._signup] * signups + [self._read] * readers
        return [asyncio.create_task(self._loop(loop)) for loop in loops]

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= moment]

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= start and o.ended <= end]

    async def successes_after(self, moment: float, count: int, within: float = 15.0) -> float:
        """Wait for ``count`` 2xx answers to requests started after ``moment``; the first one's delay."""
        def ok() -> list[Outcome]:
            return [o for o in self.since(moment) if o.status < 400]

        await eventually(lambda: len(ok()) >= count, within=within)
        return min(o.ended for o in ok()) - moment


async def existing_emails(dsn: str, emails: list[str]) -> set[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT email FROM users WHERE email = ANY($1::text[])", emails)
    finally:
        await connection.close()
    return {row["email"] for row in rows}


@pytest.mark.slow
@pytest.mark.postgres
async def test_postgres_restarted_under_load_recovers_without_restarting_the_app() -> None:
    require_pg_cluster()
    with PgCluster("restarts") as pg:
        url = await migrated(await pg.create_database("atrium"))
        settings = make_settings(
            database_url=url, auto_migrate=False,
            database_pool_size=5, database_max_overflow=5,
            database_pool_timeout=POOL_TIMEOUT, database_connect_timeout=CONNECT_TIMEOUT,
            job_min_backoff_ms=100, job_max_backoff_ms=500, outbox_poll_interval=0.2,
            **CHEAP_HASHING, **GENEROUS_RATE_LIMITS,
        )
        app = create_app(settings)
        async with serve(app) as client:
            engine = app.state.container.engine()
            admin = await create_admin(app, client)
            for n in range(3):
                created = await client.post("/api/v1/items", headers=admin,
                                            json={"name": f"Thing {n}", "price": 100 + n, "currency": "EUR"})
                assert created.status_code == 201, created.text
            load = Load(client)
            tasks = load.start()
            try:
                await load.successes_after(time.monotonic(), 20)

                # (a) one `pg_ctl restart -m fast`: sessions are terminated, the server is back quickly.
                restart_began = time.monotonic()
                await asyncio.to_thread(pg.restart, "fast")
                restarted = time.monotonic()
                restart_recovery = await load.successes_after(restarted, 20)

                # (b) a stop, a 2 s gap with nothing listening, a start.
                stop_began = time.monotonic()
                await asyncio.to_thread(pg.stop, "fast")
                down = time.monotonic()
                ready_while_down = await client.get("/health/ready")
                await asyncio.sleep(2.0)
                up_began = time.monotonic()
                await asyncio.to_thread(pg.start)
                up = time.monotonic()
                recovery = await load.successes_after(up, 30)
                ready_after = await client.get("/health/ready")
            finally:
                load.stopping.set()
                await asyncio.gather(*tasks)
            assert app.state.container.engine() is engine  # the same app and pool all along

            outcomes = load.outcomes
            errors = [o for o in outcomes if o.status >= 400]
            unexpected = [o for o in errors if (o.status, o.code) != (503, "service_unavailable")]
            assert not unexpected, unexpected[:5]  # no 500s, no other error: only 503 envelopes
            assert all(o.retry_after == "1" for o in errors)

            # During the gap every request needing the database got a quick 503.
            in_gap = load.between(down, up_began)
            assert len(in_gap) >= 10, f"only {len(in_gap)} requests during the outage"
            assert all(o.status == 503 for o in in_gap), [(o.kind, o.status) for o in in_gap]
            slowest = max(o.took for o in outcomes)
            assert slowest < POOL_TIMEOUT + CONNECT_TIMEOUT + 1.5, f"a request took {slowest:.2f}s"
            error = assert_envelope(ready_while_down, 503, "not_ready")
            assert error["details"]["checks"]["database"]["status"] == "down"
            assert ready_after.status_code == 200, ready_after.text

            # Back without restarting the app: everything asked after the server was up succeeded.
            after_up = load.since(up)
            after_restart = load.between(restarted, stop_began)
            assert all(o.status < 400 for o in after_up), [o.status for o in after_up]
            assert all(o.status < 400 for o in after_restart), [o.status for o in after_restart]

            # No committed write lost: every signup answered 201 is in the database (and its event
            # left the outbox: the welcome email went out).
            created_emails = [o.email for o in outcomes if o.kind == "signup" and o.status == 201 and o.email]
            refused_emails = [o.email for o in outcomes if o.kind == "signup" and o.status == 503 and o.email]
            stored = await existing_emails(pg.dsn("atrium"), created_emails + refused_emails)
            assert set(created_emails) <= stored, set(created_emails) - stored
            sender = app.state.container.email_sender()

            def welcomed() -> bool:
                return set(created_emails) <= {m.to for m in list(sender.sent)}

            await eventually(welcomed, within=30)

            during_restart = [o for o in outcomes if restart_began <= o.started <= restarted]
            print(
                f"\n[pg restart under load] requests={len(outcomes)} 2xx={len(outcomes) - len(errors)} "
                f"503={len(errors)} 500=0; restart -m fast took {restarted - restart_began:.2f}s "
                f"({len(during_restart)} requests began meanwhile, "
                f"{sum(o.status == 503 for o in during_restart)} of them 503), first 2xx "
                f"{restart_recovery:.2f}s after it; stop took {down - stop_began:.2f}s, {len(in_gap)} "
                f"requests in the {up_began - down:.1f}s gap all 503; start took {up - up_began:.2f}s, "
                f"first 2xx {recovery:.2f}s after it, {len(after_up)} requests after it all 2xx; "
                f"slowest request {slowest:.2f}s; signups 201={len(created_emails)} (all stored, all "
                f"welcomed), 503={len(refused_emails)} (stored anyway: {len(stored & set(refused_emails))})"
            )


# --- 2. the Redis cache stopped and started again ----------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
async def test_cache_down_item_reads_bypass_it_and_use_it_again_once_back(tmp_path: Path) -> None:
    require_redis_server("the private cache")
    with RedisServer() as redis:
        settings = make_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'cache.db'}",
            cache_backend="redis", redis_url=redis.url, cache_namespace=f"atrium-{uuid.uuid4().hex[:8]}",
            **CHEAP_HASHING, **GENEROUS_RATE_LIMITS,
        )
        app = create_app(settings)
        async with serve(app) as client:
            registry = app.state.container.metrics_registry()

            def counted(result: str) -> float:
                labels = {"cache": "items", "result": result}
                return registry.get_sample_value("atrium_cache_requests_total", labels) or 0.0

            admin = await create_admin(app, client)
            created = await client.post("/api/v1/items", headers=admin,
                                        json={"name": "Cached", "price": 500, "currency": "EUR"})
            assert created.status_code == 201
            path = f"/api/v1/items/{created.json()['id']}"
            first = await client.get(path)
            assert first.status_code == 200
            assert (await client.get(path)).status_code == 200
            hits_before = counted("hit")
            assert hits_before >= 1
            assert (await client.get("/health/ready")).status_code == 200

            redis.stop()
            started = time.monotonic()
            during = [await client.get(path) for _ in range(10)]
            outage_reads = time.monotonic() - started
            assert [r.status_code for r in during] == [200] * 10
            assert {r.headers["etag"] for r in during} == {first.headers["etag"]}
            assert counted("hit") == hits_before  # nothing came from the cache
            assert counted("error") >= 1
            assert counted("bypass") >= 1
            ready = assert_envelope(await client.get("/health/ready"), 503, "not_ready")
            assert ready["details"]["checks"]["cache"]["status"] == "down"
            assert ready["details"]["checks"]["database"]["status"] == "ok"
            assert "cache" in ready["message"]

            redis.start()  # same port, empty
            back = time.monotonic()

            async def ready_again() -> bool:
                return (await client.get("/health/ready")).status_code == 200

            await eventually(ready_again, within=10)

            async def hits_again() -> bool:
                assert (await client.get(path)).status_code == 200
                return counted("hit") > hits_before

            await eventually(hits_again, within=15)  # after the read-through cache's cool-off
            print(f"\n[cache down] 10 reads during the outage: all 200 in {outage_reads:.2f}s "
                  f"(errors={counted('error'):.0f}, bypasses={counted('bypass'):.0f}); cache hits again "
                  f"{time.monotonic() - back:.1f}s after redis-server came back")


# --- 3. `atrium serve` stopped with SIGTERM while requests are in flight ---------------------


def _server_read_everything(port: int) -> bool:
    """No connection to ``port`` waits to be accepted and none has unread bytes (Linux /proc/net/tcp).

    Then every request sent so far is in the server's hands: uvicorn has accepted its connection
    and read it. Those are the requests a graceful shutdown must answer.
    """
    suffix = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if local.endswith(suffix) and state in ("0A", "01") and int(queues.split(":")[1], 16):
            return False  # 0A listening: connections not yet accepted; 01 established: bytes unread
    return True


def _start_serve(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "main", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.mark.slow
async def test_serve_finishes_in_flight_requests_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "serve.db"
    log_path = tmp_path / "serve.log"
    env = as_environment({
        "env": "development", "database_url": f"sqlite+aiosqlite:///{database}", "email_backend": "memory",
        "password_time_cost": 1, "password_memory_cost": 8192, "log_level": "INFO",
        **GENEROUS_RATE_LIMITS,
    })
    process = _start_serve(port, env, log_path)
    try:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
            async def live() -> bool:
                try:
                    return (await client.get("/health/live")).status_code == 200
                except httpx.TransportError:
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    return False

            await eventually(live, within=30)
            answered: list[float] = []
            sent: set[int] = set()

            async def sign_up(n: int) -> httpx.Response:
                async def trace(event: str, _info: Any) -> None:
                    if event == "http11.send_request_body.complete":
                        sent.add(n)

                response = await client.post("/api/v1/users", json={
                    "email": f"flight-{n}-{uuid.uuid4().hex[:6]}@example.com",
                    "password": "correct horse battery", "full_name": "In Flight", "age": 30},
                    extensions={"trace": trace})
                answered.append(time.monotonic())
                return response

            tasks = [asyncio.create_task(sign_up(n)) for n in range(100)]
            # SIGTERM once every request is in the server's hands and a few have been answered:
            # the other ~90 are in flight (hashing, queued for SQLite's write lock, ...).
            await eventually(
                lambda: len(sent) == 100 and len(answered) >= 10 and _server_read_everything(port), within=30
            )
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        code = await asyncio.to_thread(process.wait, 60)
        stopped = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = log_path.read_text(errors="replace")

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} requests got no answer, e.g. {failures[:3]!r}"
    statuses = [r.status_code for r in results if isinstance(r, httpx.Response)]
    assert statuses == [201] * 100, sorted(set(statuses))
    in_flight = sum(1 for moment in answered if moment >= signalled)
    assert in_flight >= 1, "SIGTERM came after every answer: nothing was in flight"
    assert code == 0, f"atrium serve exited {code}:\n{log_text[-3000:]}"
    assert "atrium stopped" in log_text
    assert _refused(port)
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM users WHERE email LIKE 'flight-%'").fetchone()[0] == 100
    print(f"\n[serve SIGTERM] 100 concurrent signups, SIGTERM after {100 - in_flight} answers: "
          f"{in_flight} in-flight requests all answered 201, exit {code} "
          f"{stopped - signalled:.2f}s after the signal")


# --- 4. `atrium worker` stopped with SIGTERM while a job is in progress -------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_worker_finishes_the_job_in_progress_on_sigterm_and_exits_0(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    async with private_production(tmp_path, pg_database_factory, worker_metrics_port=0) as env:
        worker = await env.start_worker()
        async with env.api() as stack:
            headers, email, invoice = await customer_with_invoice(stack)
            handle = env.gateway.hold_after_charge()
            try:
                accepted = await pay(stack, headers, invoice["id"])
                assert accepted.status_code == 202, accepted.text
                payment_id = accepted.json()["id"]
                assert await asyncio.to_thread(handle.charged.wait, 20), env.log_of(worker)[-3000:]

                # The job has charged and waits for the gateway's answer: now SIGTERM.
                worker.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await eventually(lambda: "worker stopping" in env.log_of(worker), within=10)
                await asyncio.sleep(0.3)
                assert worker.poll() is None, "the worker left with a job in progress"
            finally:
                handle.release()
            code = await asyncio.to_thread(worker.wait, 40)
            stopped = time.monotonic()
            assert code == 0, f"worker exited {code}:\n{env.log_of(worker)[-3000:]}"

            # It finished the job before leaving: the payment succeeded, charged once.
            assert (await payment_of(stack, headers, payment_id))["status"] == "succeeded"
            assert await invoice_status(stack, headers, invoice["id"]) == "paid"
            assert len(env.gateway.ledger.successful_charges(payment_id)) == 1

            # Nothing lost: what the stopping worker had not delivered (the receipt job) is
            # delivered by the next worker, once.
            second = await env.start_worker()
            await eventually(lambda: receipts(stack, email) == 1, within=20)
            await holds_for(lambda: receipts(stack, email) == 1, 1.0)
            assert len(env.gateway.ledger.successful_charges(payment_id)) == 1
            assert env.gateway.ledger.requests.count(payment_id) == 1
            await env.stop_worker(second)
            print(f"\n[worker SIGTERM] job held at the gateway when signalled; worker finished it and "
                  f"exited {code} {stopped - signalled:.2f}s after the signal; payment succeeded, 1 charge, "
                  f"1 receipt")
