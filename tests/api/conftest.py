"""The API suite runs twice: on the development profile and on a production-like profile.

development: SQLite file, in-memory cache, StubBroker with the in-process worker, in-memory email.
production:  PostgreSQL, Redis cache, Redis broker, SMTP to a local server, the HTTP payment
             gateway adapter against a local gateway server, and a real ``atrium worker``
             process running the jobs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from config import Settings
from main import create_app
from modules.billing.adapters.gateway import FakePaymentGateway
from tests.support.db import migrated
from tests.support.gateway import GatewayServer
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, TEST_SECRET, make_settings
from tests.support.smtp import SmtpServer
from tests.support.stack import Delivery, Gateway, Stack, serve
from tests.support.worker import start_worker, stop_worker, wait_until_started

# ATRIUM_TEST_PROFILES narrows the profiles (a comma list). scripts/test's second pass, with the fast
# path off, runs production only: every piece of the fast path is in play there (the handler, and the
# asyncpg transactions, pool and Redis pieces that development's SQLite and memory adapters never reach).
PROFILES = tuple(name.strip() for name in
                 os.environ.get("ATRIUM_TEST_PROFILES", "development,production").split(",") if name.strip())
if not PROFILES or not set(PROFILES) <= {"development", "production"}:
    raise pytest.UsageError(f"ATRIUM_TEST_PROFILES={os.environ.get('ATRIUM_TEST_PROFILES')!r}: "
                            "expected development, production or both")


@pytest.fixture(scope="session", params=PROFILES)
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
        async with serve(app) as client:
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
        worker = start_worker(values, log_path)
        await wait_until_started(worker, log_path)
        app = create_app(settings)

        def count_prod(to: str) -> int:
            return sum(1 for m in smtp.messages if to in m.rcpt_tos)

        def mails_prod(to: str) -> list[tuple[str, str]]:
            return [(m.subject, m.body) for m in smtp.messages if to in m.rcpt_tos]

        gateway = Gateway(gateway_server.ledger, gateway_server.fail_next, gateway_server.settle_pending)
        try:
            async with serve(app) as client:
                yield Stack("production", settings, app, client, smtp.wait_for, count_prod, gateway,
                            mails_prod, log_path, gateway_server)
        finally:
            code = stop_worker(worker)
            await flush_redis_namespace(namespace)
        assert code == 0, f"worker exited with {code}:\n{log_path.read_text()[-3000:]}"


@pytest.fixture
def client(stack: Stack) -> httpx.AsyncClient:
    return stack.client
