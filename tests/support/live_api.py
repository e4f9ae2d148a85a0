"""A real ``atrium serve`` process on either profile, for clients that speak HTTP over a socket.

development: a SQLite file (migrated at start), in-memory cache, StubBroker with the in-process
             worker, console mail, the fake payment gateway.
production:  its own PostgreSQL database and Redis namespace, SMTP to a local server, the HTTP
             gateway adapter against a local gateway server, and a real ``atrium worker``.

    async with live_api("production", tmp_path, pg_database_factory) as api:
        api.base_url, await api.admin_token()
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.api_process import Cli, cli_runner, serve_process
from tests.support.production import private_production
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, TEST_SECRET

PROFILES = ("development", "production")


@dataclass
class LiveApi:
    profile: str
    base_url: str
    client: httpx.AsyncClient  # bound to base_url
    values: dict[str, Any]  # the process's settings (ATRIUM_* variables)
    cli: Cli  # `atrium <args>` with the same settings

    async def admin_token(self) -> str:
        """A new administrator (made with `atrium create-admin`), logged in; returns its bearer token."""
        email, password = f"admin-{uuid.uuid4().hex[:12]}@example.com", "admin password 123"
        await self.cli("create-admin", "--email", email, "--password", password)
        form = {"username": email, "password": password}
        response = await self.client.post("/api/v1/auth/token", data=form)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@asynccontextmanager
async def live_api(
    profile: str, tmp: Path, pg_database_factory: Callable[[], Awaitable[str]], **overrides: Any
) -> AsyncIterator[LiveApi]:
    """``atrium serve`` on a free port of 127.0.0.1 with ``profile``'s adapters; ``overrides`` win."""
    if profile == "development":
        values: dict[str, Any] = {
            "env": "development",
            "modules": ("users", "items", "billing"),
            "secret_key": TEST_SECRET,
            "database_url": f"sqlite+aiosqlite:///{tmp / 'live.db'}",
            "log_level": "WARNING",
            **CHEAP_HASHING, **GENEROUS_RATE_LIMITS, **overrides,
        }
        async with serve_process(values, tmp / "api.log") as client:
            yield LiveApi(profile, str(client.base_url).rstrip("/"), client, values, cli_runner(values))
        return
    if profile != "production":
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    async with private_production(tmp, pg_database_factory, **GENEROUS_RATE_LIMITS, **overrides) as env:
        await env.start_worker()
        values = {**env.values, "log_level": "WARNING"}
        async with serve_process(values, tmp / "api.log") as client:
            yield LiveApi(profile, str(client.base_url).rstrip("/"), client, values, cli_runner(values))
        await env.stop_worker(env.workers[0])
