"""``atrium disable-user``, ``enable-user`` and ``set-admin``, run as real subprocesses against a
SQLite file that an API in this process serves at the same time: the database says what changed,
and the live tokens of that API follow. (Across two API processes on PostgreSQL + Redis:
tests/api/test_sessions.py::TestAcrossProcesses.)"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from main import create_app
from tests.support.api import bearer, signup_body
from tests.support.cli import run_cli
from tests.support.envelope import assert_envelope
from tests.support.settings import CHEAP_HASHING, make_settings
from tests.support.stack import serve
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

ME = "/api/v1/users/me"
ITEMS = "/api/v1/items"
ITEM = {"name": "CLI lamp", "description": "d", "price": 100, "currency": "EUR"}


async def cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, database_url=database_url)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout.strip()


def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines, without the fast path's start-up note on library versions it was not verified on."""
    return [line for line in result.stderr.strip().splitlines() if "fast path off:" not in line]


@dataclass
class Api:
    client: httpx.AsyncClient
    url: str
    path: Path

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as connection:
            return list(connection.execute(sql, params))

    async def account(self) -> tuple[dict[str, Any], dict[str, str]]:
        """A new user (its sign-up body) and the bearer headers of one session of it."""
        body = signup_body()
        assert (await self.client.post("/api/v1/users", json=body)).status_code == 201
        return body, bearer(await self.login(body))

    async def login(self, body: dict[str, Any]) -> str:
        response = await self.client.post("/api/v1/auth/token",
                                          data={"username": body["email"], "password": body["password"]})
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on a SQLite file, with no shared cache: each process keeps only its 1 s window, so
    a change the CLI commits is seen here within a second (README "Sessions": in development the
    cache is in-process, and the CLI cannot reach it)."""
    path = tmp_path / "atrium.db"
    url = f"sqlite+aiosqlite:///{path}"
    app = create_app(make_settings(database_url=url, cache_backend="none", **CHEAP_HASHING))
    async with serve(app) as client:
        yield Api(client, url, path)


async def test_disable_user_ends_the_sessions_and_refuses_the_tokens(api: Api) -> None:
    body, headers = await api.account()
    await api.login(body)  # a second session
    assert (await api.client.get(ME, headers=headers)).status_code == 200

    out = ok(await cli("disable-user", body["email"].upper(), database_url=api.url))

    assert out.splitlines()[-1] == f"disabled: {body['email']} (2 sessions ended)"
    assert api.rows("SELECT is_active FROM users WHERE email = ?", body["email"]) == [(0,)]
    reasons = api.rows("SELECT s.revoked_reason FROM user_sessions s JOIN users u ON u.id = s.user_id "
                       "WHERE u.email = ? AND s.revoked_at IS NOT NULL", body["email"])
    assert reasons == [("account_disabled",), ("account_disabled",)]

    async def refused() -> bool:
        return (await api.client.get(ME, headers=headers)).status_code == 401

    await eventually(refused, within=1.5)
    assert_envelope(await api.client.get(ME, headers=headers), 401, "account_disabled")
    login = await api.client.post("/api/v1/auth/token",
                                  data={"username": body["email"], "password": body["password"]})
    assert_envelope(login, 403, "account_disabled")


async def test_enable_user_lets_the_account_sign_in_again_but_revives_no_session(api: Api) -> None:
    body, headers = await api.account()
    ok(await cli("disable-user", body["email"], database_url=api.url))

    out = ok(await cli("enable-user", body["email"], database_url=api.url))

    assert out.splitlines()[-1] == f"enabled: {body['email']}"
    assert api.rows("SELECT is_active FROM users WHERE email = ?", body["email"]) == [(1,)]
    fresh = bearer(await api.login(body))
    assert (await api.client.get(ME, headers=fresh)).status_code == 200
    assert_envelope(await api.client.get(ME, headers=headers), 401, "invalid_token")


async def test_set_admin_grants_and_revokes_the_role_on_live_tokens(api: Api) -> None:
    body, headers = await api.account()
    assert_envelope(await api.client.post(ITEMS, json=ITEM, headers=headers), 403, "forbidden")

    out = ok(await cli("set-admin", body["email"], database_url=api.url))

    assert out.splitlines()[-1] == f"administrator: {body['email']}"
    assert api.rows("SELECT is_admin FROM users WHERE email = ?", body["email"]) == [(1,)]

    async def status() -> int:
        return (await api.client.post(ITEMS, json=ITEM, headers=headers)).status_code

    await eventually(lambda: _is(status, 201), within=1.5)

    out = ok(await cli("set-admin", body["email"], "--revoke", database_url=api.url))

    assert out.splitlines()[-1] == f"not an administrator: {body['email']}"
    assert api.rows("SELECT is_admin FROM users WHERE email = ?", body["email"]) == [(0,)]
    await eventually(lambda: _is(status, 403), within=1.5)


async def _is(status: Any, expected: int) -> bool:
    return bool(await status() == expected)


@pytest.mark.parametrize(
    "args",
    [("disable-user",), ("enable-user",), ("set-admin",), ("set-admin", "--revoke")],
)
async def test_an_unknown_email_is_one_clear_line_and_changes_nothing(
    api: Api, args: tuple[str, ...]
) -> None:
    body, headers = await api.account()
    before = api.rows("SELECT email, is_admin, is_active FROM users ORDER BY email")

    result = await cli(args[0], "ghost@example.com", *args[1:], database_url=api.url)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert errors(result) == ["atrium: No account has the email ghost@example.com."]
    assert api.rows("SELECT email, is_admin, is_active FROM users ORDER BY email") == before
    assert (await api.client.get(ME, headers=headers)).status_code == 200
    assert body["email"] in [row[0] for row in before]


def test_the_email_argument_is_required() -> None:
    result = run_cli("disable-user", database_url="sqlite+aiosqlite:///unused.db")
    assert result.returncode == 2
    assert "email" in result.stderr
