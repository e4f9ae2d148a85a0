"""The API suite runs twice: on the development profile and on a production-like profile.

development: SQLite file, in-memory cache, StubBroker with the in-process worker, in-memory email.
production:  PostgreSQL, Redis cache, Redis broker, SMTP to a local server, the HTTP payment
             gateway adapter against a local gateway server, and a real ``atrium worker``
             process running the jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from config import Settings
from core.db.session import UnitOfWork
from main import create_app
from modules.billing.adapters.gateway import FakePaymentGateway, GatewayEvent, GatewayLedger
from tests.conftest import TEST_SECRET, make_settings, migrated
from tests.support.gateway import GatewayServer
from tests.support.services import REDIS_URL, require
from tests.support.smtp import SmtpServer

ROOT = Path(__file__).resolve().parents[2]
CHEAP_HASHING = {"password_time_cost": 1, "password_memory_cost": 1024}
# The session stacks serve the whole suite from one client address: limits it never reaches (a
# string, so the worker's environment carries it too). tests/api/test_rate_limits.py sets tight ones.
GENEROUS_RATE_LIMITS = {
    "rate_limits": "default=1000000/minute,auth_client=1000000/minute,auth_account=1000000/minute"
}


Delivery = tuple[GatewayEvent, bytes, dict[str, str]]


@dataclass
class Gateway:
    """The payment gateway behind a stack, seen from the test: its ledger and its faults."""

    ledger: GatewayLedger
    fail_next: Callable[[int], None]
    settle_pending: Callable[[], list[Delivery]]  # signed webhook deliveries, for the test to post


@dataclass
class Stack:
    profile: str
    settings: Settings
    app: FastAPI
    client: httpx.AsyncClient
    wait_for_mail: Callable[[str], Awaitable[Any]]
    mail_count: Callable[[str], int]
    gateway: Gateway
    mails: Callable[[str], list[tuple[str, str]]]  # (subject, body) of every mail to an address
    worker_log: Path | None = None
    gateway_server: GatewayServer | None = None

    @property
    def container(self) -> Any:
        return self.app.state.container


def as_environment(values: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    for key, value in values.items():
        env[f"ATRIUM_{key.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
    return env


@asynccontextmanager
async def _serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://atrium.test") as client:
            yield client


def _start_worker(values: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "main", "worker", "--threads", "2"],
        cwd=ROOT,
        env=as_environment(values),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def _has_started(log_path: Path) -> bool:
    return "worker started" in log_path.read_text(errors="replace")


async def _wait_until_started(process: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(600):
        if _has_started(log_path):
            return
        if process.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"atrium worker did not start:\n{_log_tail(log_path)}")


def _stop_worker(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture(scope="session", params=["development", "production"])
async def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_database_factory: Callable[[], Awaitable[str]],
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "development":
        settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp / 'dev.db'}", **CHEAP_HASHING,
                                 **GENEROUS_RATE_LIMITS)
        app = create_app(settings)
        sender = app.state.container.email_sender()

        async def wait_dev(to: str) -> Any:
            return await sender.wait_for(lambda m: m.to == to, timeout=15)

        def count_dev(to: str) -> int:
            return sum(1 for m in sender.sent if m.to == to)

        fake: FakePaymentGateway = app.state.container.billing.payment_gateway()

        def settle_dev() -> list[Delivery]:
            return [(event, *fake.signed(event)) for event in fake.ledger.settle_pending()]

        def mails_dev(to: str) -> list[tuple[str, str]]:
            return [(m.subject, m.body) for m in sender.sent if m.to == to]

        gateway = Gateway(fake.ledger, fake.fail_next, settle_dev)
        async with _serve(app) as client:
            yield Stack("development", settings, app, client, wait_dev, count_dev, gateway, mails_dev)
        return

    require("postgres")
    require("redis")
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    with SmtpServer() as smtp, GatewayServer() as gateway_server:
        values: dict[str, Any] = {
            "env": "production",
            "modules": ("users", "items", "billing"),
            "secret_key": TEST_SECRET,
            "database_url": await migrated(await pg_database_factory()),
            "cache_backend": "redis",
            "redis_url": REDIS_URL,
            "cache_namespace": namespace,
            "broker_backend": "redis",
            "broker_url": REDIS_URL,
            "broker_namespace": namespace,
            "email_backend": "smtp",
            "smtp_host": smtp.host,
            "smtp_port": smtp.port,
            "payments_url": gateway_server.url,
            "payments_api_key": gateway_server.api_key,
            "payments_webhook_secret": gateway_server.webhook_secret,
            "payments_timeout": 2.0,
            "job_min_backoff_ms": 100,
            "job_max_backoff_ms": 1000,
            "log_level": "INFO",
            "log_json": True,
            "outbox_poll_interval": 0.2,
            **CHEAP_HASHING,
            **GENEROUS_RATE_LIMITS,
        }
        settings = Settings(**{**values, "log_level": "WARNING"})
        log_path = tmp / "worker.log"
        worker = _start_worker(values, log_path)
        await _wait_until_started(worker, log_path)
        app = create_app(settings)

        def count_prod(to: str) -> int:
            return sum(1 for m in smtp.messages if to in m.rcpt_tos)

        def mails_prod(to: str) -> list[tuple[str, str]]:
            return [(m.subject, m.body) for m in smtp.messages if to in m.rcpt_tos]

        gateway = Gateway(gateway_server.ledger, gateway_server.fail_next, gateway_server.settle_pending)
        try:
            async with _serve(app) as client:
                yield Stack("production", settings, app, client, smtp.wait_for, count_prod, gateway,
                            mails_prod, log_path, gateway_server)
        finally:
            code = _stop_worker(worker)
            await _flush_redis_namespace(namespace)
        assert code == 0, f"worker exited with {code}:\n{log_path.read_text()[-3000:]}"


async def _flush_redis_namespace(namespace: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def client(stack: Stack) -> httpx.AsyncClient:
    return stack.client


# --- small helpers for tests ---------------------------------------------------------------------


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def signup_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "email": unique_email(),
        "password": "correct horse battery",
        "full_name": "Ada Lovelace",
        "age": 36,
    }
    body.update(overrides)
    return body


async def sign_up(client: httpx.AsyncClient, **overrides: Any) -> tuple[dict[str, Any], str]:
    """Create a user and log in; returns (user json, bearer token)."""
    body = signup_body(**overrides)
    created = await client.post("/api/v1/users", json=body)
    assert created.status_code == 201, created.text
    token = await login(client, body["email"], body["password"])
    return created.json(), token


async def login(client: httpx.AsyncClient, email: str, password: str) -> str:
    response = await client.post("/api/v1/auth/token", data={"username": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_admin(stack: Stack) -> str:
    """An admin made the way the CLI does it (service call in a unit of work); returns a token."""
    email, password = unique_email("admin"), "admin password 123"
    async with UnitOfWork(stack.container.sessions()) as session:
        await stack.container.users.service().create_admin(session, email, password, "Root Admin")
    return await login(stack.client, email, password)


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
