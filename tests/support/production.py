"""A private production-like environment for one test: its own database, gateway, SMTP server and
broker namespace (or broker), and real ``atrium worker`` processes, so that killing or stopping
something never touches the session stacks."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from config import Settings
from main import create_app
from tests.support.db import migrated
from tests.support.gateway import GatewayServer
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, TEST_SECRET
from tests.support.smtp import SmtpServer
from tests.support.stack import Gateway, Stack, serve
from tests.support.worker import start_worker, stop_worker, wait_until_started


@dataclass
class Private:
    """Settings and servers of one test's own production-like environment."""

    tmp: Path
    values: dict[str, Any]
    namespace: str
    smtp: SmtpServer
    gateway: GatewayServer
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    responses: list[tuple[str, str, int]] = field(default_factory=list)  # every API answer

    async def start_worker(self) -> subprocess.Popen[bytes]:
        log_path = self.tmp / f"worker-{len(self.workers) + 1}.log"
        process = start_worker(self.values, log_path)
        self.workers.append(process)
        await wait_until_started(process, log_path)
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"worker-{self.workers.index(process) + 1}.log").read_text(errors="replace")

    async def stop_worker(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM; the worker must finish and exit 0."""
        code = await asyncio.to_thread(stop_worker, process)
        assert code == 0, f"worker exited with {code}:\n{self.log_of(process)[-3000:]}"

    @asynccontextmanager
    async def api(self) -> AsyncIterator[Stack]:
        """The API in this process, on this environment, as a ``Stack`` (minus the shared worker)."""
        settings = Settings(**{**self.values, "log_level": "WARNING"})
        app = create_app(settings)
        smtp, gateway = self.smtp, self.gateway

        async def record(response: httpx.Response) -> None:
            self.responses.append((response.request.method, response.request.url.path, response.status_code))

        def mails(to: str) -> list[tuple[str, str]]:
            return [(m.subject, m.body) for m in smtp.messages if to in m.rcpt_tos]

        async with serve(app) as client:
            client.event_hooks["response"].append(record)
            yield Stack(
                profile="production", settings=settings, app=app, client=client,
                wait_for_mail=smtp.wait_for,
                mail_count=lambda to: sum(1 for m in smtp.messages if to in m.rcpt_tos),
                gateway=Gateway(gateway.ledger, gateway.fail_next, gateway.settle_pending),
                mails=mails, gateway_server=gateway,
            )

    def server_errors(self) -> list[tuple[str, str, int]]:
        """Every 5xx the API answered, readiness probes excepted (their 503 is the point)."""
        return [r for r in self.responses if r[2] >= 500 and r[1] != "/health/ready"]


@asynccontextmanager
async def private_production(
    tmp: Path, pg_database_factory: Callable[[], Awaitable[str]], *, broker_url: str = REDIS_URL,
    **overrides: Any,
) -> AsyncIterator[Private]:
    """Like the session stack's production profile, but every server and name is this test's own.

    Whatever happens, worker processes are killed and the Redis namespace is flushed on the way out.
    """
    require("postgres")
    require("redis")
    database_url = await migrated(await pg_database_factory())
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    with SmtpServer() as smtp, GatewayServer() as gateway:
        values: dict[str, Any] = {
            "env": "production",
            "modules": ("users", "items", "billing"),
            "secret_key": TEST_SECRET,
            "database_url": database_url,
            "cache_backend": "redis",
            "redis_url": REDIS_URL,
            "cache_namespace": namespace,
            "broker_backend": "redis",
            "broker_url": broker_url,
            "broker_namespace": namespace,
            "email_backend": "smtp",
            "smtp_host": smtp.host,
            "smtp_port": smtp.port,
            "payments_url": gateway.url,
            "payments_api_key": gateway.api_key,
            "payments_webhook_secret": gateway.webhook_secret,
            "payments_timeout": 2.0,
            "job_min_backoff_ms": 100,
            "job_max_backoff_ms": 1000,
            "log_level": "INFO",
            "log_json": True,
            "outbox_poll_interval": 0.2,
            **CHEAP_HASHING,
            **overrides,
        }
        env = Private(tmp, values, namespace, smtp, gateway)
        try:
            yield env
        finally:
            for process in env.workers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            await flush_redis_namespace(namespace)
