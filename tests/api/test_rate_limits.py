"""Rate limits through the real app: who is counted, what a refusal looks like, the login limits,
a limiter that is down, the metric, and a burst of concurrent requests.

Each test builds a small app with tight policies (``create_app(make_settings(...))``); the session
``stack`` keeps generous limits and is only used to check the wiring on both profiles.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI

from config import ConfigError, load_settings
from core.security import Principal
from main import create_app
from tests.support.api import bearer, signup_body
from tests.support.envelope import assert_envelope
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, make_settings
from tests.support.stack import Stack, serve

ITEMS = "/api/v1/items"
TOKEN = "/api/v1/auth/token"
ME = "/api/v1/users/me"
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once
LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
PROXY = {"trusted_proxies": ("127.0.0.1",)}  # httpx's ASGI transport connects from 127.0.0.1


@asynccontextmanager
async def limited_app(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app on its own SQLite file; with the Redis limiter, on its own namespace."""
    namespace = f"atrium-test-rl-{uuid.uuid4().hex[:10]}"
    overrides.setdefault("rate_limit_backend", "memory")  # whatever ATRIUM_RATE_LIMIT_BACKEND says
    if overrides.get("redis_url") == REDIS_URL:
        require("redis")
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / f'{namespace}.db'}", cache_namespace=namespace,
        **CHEAP_HASHING, **overrides,
    )
    app = create_app(settings)
    try:
        async with serve(app) as client:
            yield app, client
    finally:
        if overrides.get("redis_url") == REDIS_URL:
            await flush_redis_namespace(namespace)


def limits(**groups: str) -> dict[str, Any]:
    return {"rate_limits": groups}


def from_client(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


def user_token(app: FastAPI) -> str:
    """A valid bearer token for a new user id (the limiter only checks the token, not the account)."""
    return app.state.container.tokens().issue(Principal(uuid.uuid4(), is_admin=False))


def rejected(app: FastAPI, group: str) -> float:
    value = app.state.metrics_registry.get_sample_value("atrium_rate_limited_total", {"group": group})
    return value or 0.0


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    return tuple(int(response.headers[name]) for name in LIMIT_HEADERS)  # type: ignore[return-value]


def assert_rate_limited(response: httpx.Response, limit: int) -> dict[str, Any]:
    error = assert_envelope(response, 429, "rate_limited")
    retry = int(response.headers["retry-after"])
    assert retry >= 1
    assert error["details"] == {"limit": limit, "retry_after": retry}
    got_limit, remaining, reset = limit_headers(response)
    assert (got_limit, remaining) == (limit, 0)
    assert reset >= retry
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])  # limited inside RequestContext
    return error


async def statuses(client: httpx.AsyncClient, n: int, path: str = ITEMS, **kwargs: Any) -> list[int]:
    return [(await client.get(path, **kwargs)).status_code for _ in range(n)]


# --- the general limit -----------------------------------------------------------------------------


class TestGeneralLimit:
    async def test_an_anonymous_client_gets_its_limit_then_a_429_envelope(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="3/minute")) as (_, client):
            responses = [await client.get(ITEMS) for _ in range(3)]
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert [limit_headers(r)[:2] for r in responses] == [(3, 2), (3, 1), (3, 0)]
            assert [limit_headers(r)[2] for r in responses] == [20, 40, 60]  # seconds until the quota is back

            refused = await client.get(ITEMS)
            error = assert_rate_limited(refused, limit=3)
            assert refused.headers["retry-after"] == "20"  # one request comes back every 20 s
            assert "20" in error["message"]

    async def test_every_limited_response_carries_the_headers(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="100/minute")) as (_, client):
            responses = [
                await client.get(ITEMS),  # 200
                await client.get(ME),  # 401
                await client.get("/api/v1/nowhere"),  # 404
                await client.delete(ME),  # 405
                await client.get(ITEMS, params={"limit": 0}),  # 422
                await client.post(TOKEN, data={"username": "a@example.com", "password": "wrong pass"}),  # 401
            ]
            assert [r.status_code for r in responses] == [200, 401, 404, 405, 422, 401]
            for response in responses:
                assert all(name in response.headers for name in LIMIT_HEADERS), response.request.url

    async def test_users_are_limited_apart_from_each_other_and_from_anonymous_callers(
        self, tmp_path: Path
    ) -> None:
        async with limited_app(tmp_path, **limits(default="2/hour")) as (app, client):
            alice, bob = bearer(user_token(app)), bearer(user_token(app))
            assert await statuses(client, 3, headers=alice) == [200, 200, 429]
            assert await statuses(client, 3, headers=bob) == [200, 200, 429]
            assert await statuses(client, 3) == [200, 200, 429]
            assert await statuses(client, 1, headers=alice) == [429]

    async def test_an_invalid_token_counts_as_anonymous(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="2/hour")) as (app, client):
            assert await statuses(client, 2) == [200, 200]
            forged = bearer(user_token(app)[:-4] + "AAAA")
            assert await statuses(client, 1, headers=forged) == [429]
            assert await statuses(client, 1, headers={"Authorization": "Basic dXNlcjpwYXNz"}) == [429]
            assert await statuses(client, 1, headers=bearer(user_token(app))) == [200]

    async def test_health_and_metrics_are_never_limited(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="1/hour")) as (_, client):
            for path in ("/health/live", "/health/ready", "/metrics"):
                for _ in range(3):
                    response = await client.get(path)
                    assert response.status_code == 200, (path, response.text)
                    assert not any(name in response.headers for name in LIMIT_HEADERS)
            assert await statuses(client, 2) == [200, 429]  # the one request allowed was not spent above

    async def test_route_groups_have_their_own_policy_and_bucket(self, tmp_path: Path) -> None:
        settings = {**limits(default="3/hour", catalog="2/hour"),
                    "rate_limit_groups": {"/api/v1/items": "catalog", "/api/v1/users": "none"}}
        async with limited_app(tmp_path, **settings) as (_, client):
            items = [await client.get(ITEMS) for _ in range(3)]
            assert [r.status_code for r in items] == [200, 200, 429]
            assert limit_headers(items[0])[0] == 2
            assert await statuses(client, 4, path="/api/v1/users/me") == [401] * 4  # exempt
            others = [await client.get("/api/v1/invoices") for _ in range(4)]
            assert [r.status_code for r in others] == [401, 401, 401, 429]  # default: 3, its own bucket
            assert limit_headers(others[0])[0] == 3

    async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="2/hour")) as (_, client):
            spoofed = [from_client(f"203.0.113.{i}") for i in range(3)]
            assert [(await client.get(ITEMS, headers=h)).status_code for h in spoofed] == [200, 200, 429]

        proxies = {"trusted_proxies": ("127.0.0.1", "10.0.0.0/8")}
        async with limited_app(tmp_path, **limits(default="2/hour"), **proxies) as (_, client):
            assert await statuses(client, 3, headers=from_client("203.0.113.1")) == [200, 200, 429]
            assert await statuses(client, 1, headers=from_client("203.0.113.2")) == [200]
            # The rightmost address a trusted proxy did not add is the client; what it claims left of
            # that is not believed.
            chain = from_client("198.51.100.9, 203.0.113.2, 10.1.2.3")
            assert await statuses(client, 1, headers=chain) == [200]
            assert await statuses(client, 1, headers=from_client("198.51.100.8, 203.0.113.2")) == [429]


# --- login -------------------------------------------------------------------------------------


async def new_account(client: httpx.AsyncClient) -> tuple[str, str]:
    body = signup_body()
    created = await client.post("/api/v1/users", json=body, headers=from_client("192.0.2.250"))
    assert created.status_code == 201, created.text
    return body["email"], body["password"]


def login(client: httpx.AsyncClient, email: str, password: str, ip: str) -> Any:
    return client.post(TOKEN, data={"username": email, "password": password}, headers=from_client(ip))


class TestLoginLimits:
    async def test_an_account_is_limited_across_clients_before_the_password_is_checked(
        self, tmp_path: Path
    ) -> None:
        async with limited_app(tmp_path, **limits(auth_account="3/hour"), **PROXY) as (app, client):
            email, password = await new_account(client)
            wrong = [await login(client, email, "wrong password", f"198.51.100.{i}") for i in range(3)]
            assert [r.status_code for r in wrong] == [401, 401, 401]

            real = app.state.container.users.service()

            class Spy:
                calls = 0

                async def issue_token(self, *args: Any) -> Any:
                    Spy.calls += 1
                    return await real.issue_token(*args)

            with app.state.container.users.service.override(providers.Object(Spy())):
                refused = await login(client, email.upper() + " ", password, "198.51.100.200")
            assert_rate_limited(refused, limit=3)
            assert Spy.calls == 0  # refused before the password (argon2) was looked at
            assert rejected(app, "auth_account") == 1

            other_email, other_password = await new_account(client)
            assert (await login(client, other_email, other_password, "198.51.100.200")).status_code == 200

    async def test_a_client_is_limited_across_accounts(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(auth_client="3/hour"), **PROXY) as (app, client):
            attempts = [await login(client, f"nobody-{i}@example.com", "wrong password", "198.51.100.7")
                        for i in range(4)]
            assert [r.status_code for r in attempts] == [401, 401, 401, 429]
            assert_rate_limited(attempts[-1], limit=3)
            assert rejected(app, "auth_client") == 1
            email, password = await new_account(client)
            assert (await login(client, email, password, "198.51.100.7")).status_code == 429
            assert (await login(client, email, password, "198.51.100.8")).status_code == 200

    async def test_the_login_headers_show_the_strictest_policy(self, tmp_path: Path) -> None:
        policies = limits(default="100/hour", auth_client="10/hour", auth_account="2/hour")
        async with limited_app(tmp_path, **policies, **PROXY) as (_, client):
            email, password = await new_account(client)
            first = await login(client, email, password, "198.51.100.1")
            assert first.status_code == 200, first.text
            assert limit_headers(first)[:2] == (2, 1)  # the account's policy, not the general one
            general = await client.get(ITEMS, headers=from_client("198.51.100.1"))
            assert limit_headers(general)[:2] == (100, 98)

    async def test_the_general_limit_applies_to_login_too(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="2/hour"), **PROXY) as (_, client):
            attempts = [await login(client, "a@example.com", "wrong password", "198.51.100.1")
                        for _ in range(3)]
            assert [r.status_code for r in attempts] == [401, 401, 429]
            assert limit_headers(attempts[0])[0] == 2


# --- the limiter's backend is down ---------------------------------------------------------------


class TestLimiterDown:
    async def test_general_routes_fail_open_and_login_fails_closed(self, tmp_path: Path) -> None:
        down = {"rate_limit_backend": "redis", "redis_url": DEAD_REDIS, **limits(default="1/hour")}
        async with limited_app(tmp_path, **down) as (_, client):
            for _ in range(3):
                response = await client.get(ITEMS)
                assert response.status_code == 200
                assert not any(name in response.headers for name in LIMIT_HEADERS)  # nothing to promise
            login = await client.post(TOKEN, data={"username": "a@example.com", "password": "password1"})
            assert_envelope(login, 503, "rate_limiter_unavailable")
            assert login.headers["retry-after"] == "1"

    async def test_both_fail_modes_are_settings(self, tmp_path: Path) -> None:
        flipped = {"rate_limit_backend": "redis", "redis_url": DEAD_REDIS,
                   "rate_limit_fail_open": False, "rate_limit_login_fail_open": True}
        async with limited_app(tmp_path, **flipped) as (_, client):
            assert_envelope(await client.get(ITEMS), 503, "rate_limiter_unavailable")
            assert (await client.get("/health/live")).status_code == 200
        async with limited_app(tmp_path, **{**flipped, "rate_limit_fail_open": True}) as (_, client):
            login = await client.post(TOKEN, data={"username": "a@example.com", "password": "password1"})
            assert_envelope(login, 401, "invalid_credentials")  # checked without a limit


# --- metrics -------------------------------------------------------------------------------------


class TestMetrics:
    async def test_rejections_are_counted_by_group_and_as_429_responses(self, tmp_path: Path) -> None:
        async with limited_app(tmp_path, **limits(default="1/hour")) as (app, client):
            assert rejected(app, "default") == 0
            assert await statuses(client, 4) == [200, 429, 429, 429]
            assert rejected(app, "default") == 3
            page = (await client.get("/metrics")).text
            assert 'atrium_rate_limited_total{group="default"} 3.0' in page
            counted = r'http_requests_total\{handler="/api/v1/items",method="GET",status="429"\} 3'
            assert re.search(counted, page)


# --- a burst -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_200_concurrent_requests_with_limit_50_let_exactly_50_through(
    tmp_path: Path, backend: str
) -> None:
    options: dict[str, Any] = {"rate_limit_backend": backend, **limits(default="50/hour")}
    if backend == "redis":
        # The limiter's timeout is wall-clock on the event loop, which this burst (and a busy CI
        # machine) keeps busy for a while: with the default 1 s, a slow connect fails open.
        options.update(redis_url=REDIS_URL, rate_limit_timeout=5.0)
    async with limited_app(tmp_path, **options) as (app, client):
        responses = await asyncio.gather(*(client.get(ITEMS) for _ in range(200)))
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 50, codes
        assert codes.count(429) == 150
        assert rejected(app, "default") == 150


# --- wiring on both profiles and configuration -------------------------------------------------


async def test_the_stack_carries_the_headers_on_both_profiles(stack: Stack) -> None:
    if "ATRIUM_RATE_LIMIT_BACKEND" in os.environ:
        pytest.skip("the environment chose the stack's rate limiter")
    response = await stack.client.get(ITEMS)
    assert response.status_code == 200
    limit, remaining, _ = limit_headers(response)
    assert limit == 1_000_000
    assert 0 < remaining < limit
    backend = "redis" if stack.profile == "production" else "memory"
    assert stack.settings.rate_limit_backend == backend


class TestConfiguration:
    def test_defaults_and_partial_overrides(self) -> None:
        assert make_settings().rate_limits == {
            "default": "600/minute", "auth_client": "30/minute", "auth_account": "5/minute"
        }
        assert make_settings(rate_limits="auth_account=3/hour").rate_limits["auth_account"] == "3/hour"
        assert make_settings(rate_limits='{"default": "10/second"}').rate_limits["auth_client"] == "30/minute"

    @pytest.mark.parametrize(
        ("overrides", "fragment"),
        [
            ({"rate_limits": "default=600/fortnight"}, "ATRIUM_RATE_LIMITS: default='600/fortnight'"),
            ({"rate_limits": "default"}, "ATRIUM_RATE_LIMITS must be"),
            ({"rate_limit_groups": "/api/v1/items=catalog"}, "does not define"),
            ({"rate_limit_groups": "api=none"}, "must start with /"),
            ({"trusted_proxies": "10.0.0.0/8,proxy.local"}, "ATRIUM_TRUSTED_PROXIES: 'proxy.local'"),
        ],
    )
    def test_a_bad_setting_is_one_line(self, overrides: dict[str, str], fragment: str) -> None:
        with pytest.raises(ConfigError) as caught:
            load_settings(env="test", **overrides)
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)

    def test_production_limits_on_redis_and_needs_its_url(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        for name in [n for n in os.environ if n.upper().startswith("ATRIUM_")]:
            monkeypatch.delenv(name)
        monkeypatch.chdir(tmp_path)  # no .env
        values = {"env": "production", "secret_key": "s" * 40, "modules": "users,items",
                  "database_url": "postgresql+asyncpg://atrium@db/atrium", "broker_backend": "redis",
                  "broker_url": "redis://queue:6379/1", "email_backend": "console", "cache_backend": "none"}
        with pytest.raises(ConfigError, match=r"ATRIUM_REDIS_URL .*ATRIUM_RATE_LIMIT_BACKEND=redis"):
            load_settings(**values)
        assert load_settings(**values, redis_url="redis://cache:6379/0").rate_limit_backend == "redis"
        assert load_settings(**values, rate_limit_backend="none").rate_limit_backend == "none"
