"""Sessions: the token pair, refresh rotation and reuse detection, logout, password change, and a
token's authority following its account (issue 15), on both profiles; then the same revocations
across two API processes (production profile only)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from loguru import logger
from sqlalchemy import select, update

from containers import build_container
from core.db.base import utcnow
from core.db.session import UnitOfWork
from core.messaging.periodic import PeriodicRunner
from core.module import ModuleError, load_modules
from core.security import AccessClaims, Principal
from main import create_app
from modules.users.domain import UnknownAccount
from modules.users.models import SessionRow
from modules.users.tasks import purge_sessions
from tests.support.api import bearer, make_admin, sign_up, signup_body, unique_email
from tests.support.api_process import production_pair
from tests.support.envelope import assert_envelope
from tests.support.settings import make_settings
from tests.support.stack import Stack, serve

USERS = "/api/v1/users"
TOKEN = "/api/v1/auth/token"
REFRESH = "/api/v1/auth/refresh"
LOGOUT = "/api/v1/auth/logout"
ME = "/api/v1/users/me"
PASSWORD = "/api/v1/users/me/password"
ITEMS = "/api/v1/items"
INVOICES = "/api/v1/invoices"
PAIR = {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}


async def account(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new user and the body it signed up with (email and password)."""
    body = signup_body()
    created = await client.post(USERS, json=body)
    assert created.status_code == 201, created.text
    return created.json(), body


async def login(
    client: httpx.AsyncClient, body: dict[str, Any], password: str | None = None
) -> dict[str, Any]:
    form = {"username": body["email"], "password": password or body["password"]}
    response = await client.post(TOKEN, data=form)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post(REFRESH, json={"refresh_token": token})


async def me_status(client: httpx.AsyncClient, pair: dict[str, Any]) -> int:
    return (await client.get(ME, headers=bearer(pair["access_token"]))).status_code


def claims_of(access_token: str) -> dict[str, Any]:
    return dict(jwt.decode(access_token, options={"verify_signature": False}))


async def as_admin_changes(stack: Stack, email: str, *, admin: bool | None = None,
                           active: bool | None = None) -> str:
    """What `atrium set-admin` / `disable-user` / `enable-user` do, in this process's container."""
    service = stack.container.users.service()
    async with UnitOfWork(stack.container.sessions()) as session:
        if admin is not None:
            return str(await service.set_admin(session, email, admin))
        assert active is not None
        return str(await service.set_active(session, email, active))


class TestLogin:
    async def test_opens_a_session_with_a_pair(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        pair = await login(client, body)
        assert set(pair) == PAIR
        assert pair["token_type"] == "bearer"
        assert pair["expires_in"] == 900
        assert pair["refresh_expires_in"] == 30 * 86_400
        assert pair["refresh_token"].startswith("rt1.")
        claims = claims_of(pair["access_token"])
        assert set(claims) == {"sub", "sid", "iss", "iat", "exp"}  # no role: it is read from the account
        assert claims["exp"] - claims["iat"] == 900
        assert await me_status(client, pair) == 200

    async def test_each_login_is_a_session_of_its_own(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        first, second = await login(client, body), await login(client, body)
        assert claims_of(first["access_token"])["sid"] != claims_of(second["access_token"])["sid"]

    async def test_a_disabled_account_is_refused_with_403_only_for_the_right_password(
        self, stack: Stack
    ) -> None:
        _, body = await account(stack.client)
        await as_admin_changes(stack, body["email"], active=False)
        right = await stack.client.post(TOKEN, data={"username": body["email"], "password": body["password"]})
        assert_envelope(right, 403, "account_disabled")
        wrong = await stack.client.post(TOKEN, data={"username": body["email"], "password": "not it at all"})
        assert_envelope(wrong, 401, "invalid_credentials")  # says nothing about the account's state


class TestRefresh:
    async def test_rotates_the_pair(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        first = await login(client, body)
        response = await refresh(client, first["refresh_token"])
        assert response.status_code == 200, response.text
        second = response.json()
        assert set(second) == PAIR
        assert second["refresh_token"] != first["refresh_token"]
        assert claims_of(second["access_token"])["sid"] == claims_of(first["access_token"])["sid"]
        assert await me_status(client, second) == 200
        third = await refresh(client, second["refresh_token"])
        assert third.status_code == 200, third.text

    async def test_a_reused_token_ends_the_whole_session(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        first = await login(client, body)
        second = (await refresh(client, first["refresh_token"])).json()
        assert await me_status(client, second) == 200

        reused = await refresh(client, first["refresh_token"])

        assert_envelope(reused, 401, "refresh_token_reused")
        # Every token of the family stops: the newest refresh token and the live access tokens too.
        assert_envelope(await refresh(client, second["refresh_token"]), 401, "refresh_token_reused")
        for pair in (first, second):
            assert_envelope(await client.get(ME, headers=bearer(pair["access_token"])), 401, "invalid_token")

    async def test_a_reuse_leaves_the_other_sessions_alone(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        other = await login(client, body)
        first = await login(client, body)
        await refresh(client, first["refresh_token"])
        assert (await refresh(client, first["refresh_token"])).status_code == 401
        assert await me_status(client, other) == 200
        assert (await refresh(client, other["refresh_token"])).status_code == 200

    async def test_two_concurrent_uses_of_one_token_one_wins(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        pair = await login(client, body)
        responses = await asyncio.gather(refresh(client, pair["refresh_token"]),
                                         refresh(client, pair["refresh_token"]))
        assert sorted(r.status_code for r in responses) == [200, 401]
        winner = next(r for r in responses if r.status_code == 200).json()
        assert_envelope(next(r for r in responses if r.status_code == 401), 401, "refresh_token_reused")
        # The loser presented a spent token: the family ends, the winner's pair included.
        assert await me_status(client, winner) == 401
        assert (await refresh(client, winner["refresh_token"])).status_code == 401

    async def test_the_session_row_keeps_the_generation_and_why_it_ended(self, stack: Stack) -> None:
        _, body = await account(stack.client)
        pair = await login(stack.client, body)
        for _ in range(3):
            pair = (await refresh(stack.client, pair["refresh_token"])).json()
        sid = uuid.UUID(claims_of(pair["access_token"])["sid"])
        async with UnitOfWork(stack.container.sessions()) as session:
            row = (await session.execute(select(SessionRow).where(SessionRow.id == sid))).scalar_one()
        assert (row.generation, row.revoked_at, row.revoked_reason) == (3, None, None)
        assert row.expires_at > row.created_at
        assert row.last_used_at >= row.created_at

    @pytest.mark.parametrize(
        ("token", "status", "code"),
        [
            ("garbage", 401, "invalid_refresh_token"),
            ("rt1." + "A" * 70, 401, "invalid_refresh_token"),
            ("rt1.\x00", 422, "validation_error"),
            ("", 422, "validation_error"),
            ("x" * 513, 422, "validation_error"),
        ],
    )
    async def test_a_token_not_ours_is_refused(
        self, client: httpx.AsyncClient, token: str, status: int, code: str
    ) -> None:
        assert_envelope(await refresh(client, token), status, code)

    async def test_a_tampered_token_is_refused(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        token = (await login(client, body))["refresh_token"]
        raw = bytearray(base64.urlsafe_b64decode(token[4:] + "=="))
        raw[19] += 1  # a later generation, without the key to sign it
        forged = "rt1." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        assert_envelope(await refresh(client, forged), 401, "invalid_refresh_token")
        assert (await refresh(client, token)).status_code == 200  # and it revoked nothing

    @pytest.mark.parametrize("payload", [{}, {"refresh_token": 5}, {"refresh_token": "x", "extra": 1}])
    async def test_a_malformed_body_is_422(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
        assert_envelope(await client.post(REFRESH, json=payload), 422, "validation_error")

    async def test_an_access_token_is_not_a_refresh_token(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        pair = await login(client, body)
        assert_envelope(await refresh(client, pair["access_token"]), 401, "invalid_refresh_token")


class TestLogout:
    async def test_ends_the_session_and_only_it(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        other, pair = await login(client, body), await login(client, body)

        response = await client.post(LOGOUT, headers=bearer(pair["access_token"]))

        assert response.status_code == 204
        assert response.content == b""
        assert_envelope(await client.get(ME, headers=bearer(pair["access_token"])), 401, "invalid_token")
        assert_envelope(await refresh(client, pair["refresh_token"]), 401, "session_ended")
        assert_envelope(await client.post(LOGOUT, headers=bearer(pair["access_token"])), 401, "invalid_token")
        assert await me_status(client, other) == 200

    async def test_needs_a_token(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.post(LOGOUT), 401, "not_authenticated")


class TestPasswordChange:
    async def test_keeps_this_session_and_ends_the_others(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        other, pair = await login(client, body), await login(client, body)
        new = "a brand new passphrase"

        response = await client.post(PASSWORD, headers=bearer(pair["access_token"]),
                                     json={"current_password": body["password"], "new_password": new})

        assert response.status_code == 204, response.text
        assert await me_status(client, pair) == 200
        assert (await refresh(client, pair["refresh_token"])).status_code == 200
        assert_envelope(await client.get(ME, headers=bearer(other["access_token"])), 401, "invalid_token")
        assert_envelope(await refresh(client, other["refresh_token"]), 401, "session_ended")
        old = await client.post(TOKEN, data={"username": body["email"], "password": body["password"]})
        assert_envelope(old, 401, "invalid_credentials")
        await login(client, body, password=new)

    async def test_a_wrong_current_password_changes_nothing(self, client: httpx.AsyncClient) -> None:
        _, body = await account(client)
        other, pair = await login(client, body), await login(client, body)
        response = await client.post(PASSWORD, headers=bearer(pair["access_token"]),
                                     json={"current_password": "not the password", "new_password": "x" * 12})
        assert_envelope(response, 403, "wrong_password")
        assert await me_status(client, other) == 200
        await login(client, body)

    @pytest.mark.parametrize(
        "change",
        [
            {"new_password": "short"},
            {"new_password": "nul\x00inside password"},
            {"new_password": "line\nbreak password"},
            {"new_password": "x" * 129},
            {"current_password": "a\x00b"},
            {"current_password": ""},
            {"extra": "field"},
        ],
    )
    async def test_invalid_input_is_422_and_changes_nothing(
        self, client: httpx.AsyncClient, change: dict[str, Any]
    ) -> None:
        _, body = await account(client)
        pair = await login(client, body)
        payload = {"current_password": body["password"], "new_password": "another fine password", **change}
        response = await client.post(PASSWORD, headers=bearer(pair["access_token"]), json=payload)
        assert_envelope(response, 422, "validation_error")
        await login(client, body)  # the old password still works

    async def test_needs_a_token(self, client: httpx.AsyncClient) -> None:
        response = await client.post(PASSWORD, json={"current_password": "a" * 8, "new_password": "b" * 8})
        assert_envelope(response, 401, "not_authenticated")


class TestAuthorityFollowsTheAccount:
    async def test_a_token_whose_session_nobody_opened_is_refused_everywhere(self, stack: Stack) -> None:
        # Issue 15: a correctly signed token for a user that does not exist could list invoices,
        # create one (201) and pay it (202).
        token = stack.container.tokens().issue(Principal(uuid.uuid4(), is_admin=True))
        headers = bearer(token)
        assert_envelope(await stack.client.get(INVOICES, headers=headers), 401, "invalid_token")
        lines = {"lines": [{"item_id": str(uuid.uuid4()), "quantity": 1}]}
        assert_envelope(await stack.client.post(INVOICES, json=lines, headers=headers), 401, "invalid_token")
        pay = await stack.client.post(f"{INVOICES}/{uuid.uuid4()}/payments",
                                      json={"payment_token": "tok_visa"},
                                      headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
        assert_envelope(pay, 401, "invalid_token")
        assert_envelope(await stack.client.post(ITEMS, json={"name": "n", "description": "d", "price": 1,
                                                             "currency": "EUR"}, headers=headers),
                        401, "invalid_token")
        assert_envelope(await stack.client.get(ME, headers=headers), 401, "invalid_token")

    async def test_a_signed_token_naming_another_user_for_a_real_session_is_refused(
        self, stack: Stack
    ) -> None:
        user, body = await account(stack.client)
        other, _ = await account(stack.client)
        pair = await login(stack.client, body)
        claims = claims_of(pair["access_token"])
        forged = jwt.encode({**claims, "sub": other["id"]}, stack.settings.secret_key, algorithm="HS256")
        assert_envelope(await stack.client.get(ME, headers=bearer(forged)), 401, "invalid_token")
        assert user["id"] == claims["sub"]

    async def test_an_admin_claim_in_a_signed_token_grants_nothing(self, stack: Stack) -> None:
        _, body = await account(stack.client)
        claims = claims_of((await login(stack.client, body))["access_token"])
        forged = jwt.encode({**claims, "adm": True}, stack.settings.secret_key, algorithm="HS256")
        item = {"name": "Not allowed", "description": "d", "price": 100, "currency": "EUR"}
        assert_envelope(await stack.client.post(ITEMS, json=item, headers=bearer(forged)), 403, "forbidden")

    async def test_demotion_and_promotion_reach_live_tokens(self, stack: Stack) -> None:
        email, password = unique_email("admin"), "admin password 123"
        async with UnitOfWork(stack.container.sessions()) as session:
            await stack.container.users.service().create_admin(session, email, password, "Demoted Admin")
        admin = bearer((await login(stack.client, {"email": email, "password": password}))["access_token"])
        item = {"name": "Admin lamp", "description": "d", "price": 100, "currency": "EUR"}
        assert (await stack.client.post(ITEMS, json=item, headers=admin)).status_code == 201

        assert await as_admin_changes(stack, email, admin=False) == f"not an administrator: {email}"
        assert_envelope(await stack.client.post(ITEMS, json=item, headers=admin), 403, "forbidden")
        assert (await stack.client.get(ME, headers=admin)).json()["is_admin"] is False

        assert await as_admin_changes(stack, email, admin=True) == f"administrator: {email}"
        assert (await stack.client.post(ITEMS, json=item, headers=admin)).status_code == 201

    async def test_disabling_ends_the_sessions_and_enabling_needs_a_new_login(self, stack: Stack) -> None:
        _, body = await account(stack.client)
        first, second = await login(stack.client, body), await login(stack.client, body)

        line = await as_admin_changes(stack, body["email"], active=False)

        assert line == f"disabled: {body['email']} (2 sessions ended)"
        for pair in (first, second):
            assert_envelope(await stack.client.get(ME, headers=bearer(pair["access_token"])),
                            401, "account_disabled")
            assert_envelope(await refresh(stack.client, pair["refresh_token"]), 401, "account_disabled")

        assert await as_admin_changes(stack, body["email"], active=True) == f"enabled: {body['email']}"
        old = await stack.client.get(ME, headers=bearer(first["access_token"]))
        assert_envelope(old, 401, "invalid_token")
        assert_envelope(await refresh(stack.client, first["refresh_token"]), 401, "session_ended")
        assert await me_status(stack.client, await login(stack.client, body)) == 200

    async def test_an_unknown_email_is_a_clear_error(self, stack: Stack) -> None:
        with pytest.raises(UnknownAccount, match="ghost-"):
            await as_admin_changes(stack, f"ghost-{uuid.uuid4().hex[:8]}@example.com", admin=True)

    async def test_an_admin_made_as_the_cli_does_works(self, stack: Stack) -> None:
        token = await make_admin(stack)
        user, _ = await sign_up(stack.client)
        response = await stack.client.get(f"{USERS}/{user['id']}", headers=bearer(token))
        assert response.status_code == 200


class TestOpenApi:
    async def test_the_session_routes_are_documented(self, stack: Stack) -> None:
        paths = stack.app.openapi()["paths"]
        token = paths[TOKEN]["post"]
        assert {"401", "403", "422", "429"} <= set(token["responses"])
        assert token["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/TokenRead")
        refreshed = paths[REFRESH]["post"]
        assert {"401", "422", "429"} <= set(refreshed["responses"])
        assert refreshed["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/TokenRead")
        assert {"204", "401"} <= set(paths[LOGOUT]["post"]["responses"])
        assert {"204", "401", "403", "422"} <= set(paths[PASSWORD]["post"]["responses"])
        assert "409" in paths[USERS]["post"]["responses"]

    async def test_the_text_rules_are_in_the_schemas(self, stack: Stack) -> None:
        document = stack.app.openapi()
        schemas = document["components"]["schemas"]
        assert "pattern" in schemas["UserCreate"]["properties"]["full_name"]
        assert "pattern" in schemas["UserCreate"]["properties"]["password"]
        assert "pattern" in schemas["RefreshRequest"]["properties"]["refresh_token"]
        form_ref = document["paths"][TOKEN]["post"]["requestBody"]["content"][
            "application/x-www-form-urlencoded"]["schema"]["$ref"].rsplit("/", 1)[-1]
        assert "pattern" in schemas[form_ref]["properties"]["username"]


class TestPurge:
    async def test_the_workers_purge_deletes_the_sessions_that_ended_long_ago_and_nothing_else(
        self, stack: Stack
    ) -> None:
        _, body = await account(stack.client)
        pairs = {name: await login(stack.client, body) for name in ("live", "expired", "revoked", "lately")}
        sid = {name: uuid.UUID(claims_of(pair["access_token"])["sid"]) for name, pair in pairs.items()}
        retention = timedelta(days=stack.settings.users_session_retention_days)
        long_ago = utcnow() - retention - timedelta(hours=1)
        lately = utcnow() - retention + timedelta(hours=1)
        ended = {"expired": {"expires_at": long_ago},
                 "revoked": {"revoked_at": long_ago, "revoked_reason": "logout"},
                 "lately": {"expires_at": lately}}  # ended, but within the retention
        async with UnitOfWork(stack.container.sessions()) as session:
            for name, values in ended.items():
                await session.execute(update(SessionRow).where(SessionRow.id == sid[name]).values(**values))

        runner = PeriodicRunner(stack.container.sessions(), {"users": stack.container.users},
                                [purge_sessions], stack.settings)
        await runner.run_once("users.purge_sessions")

        async with UnitOfWork(stack.container.sessions()) as session:
            left = set(await session.scalars(select(SessionRow.id).where(SessionRow.id.in_(sid.values()))))
        assert left == {sid["live"], sid["lately"]}
        gone = await refresh(stack.client, pairs["expired"]["refresh_token"])  # an unknown session now
        assert_envelope(gone, 401, "invalid_refresh_token")
        assert (await refresh(stack.client, pairs["live"]["refresh_token"])).status_code == 200


# --- across processes ------------------------------------------------------------------------------

# The promise is 1 s. A process holds what it read of a session for auth_cache_seconds (0.5 s by
# default, 1 s at most), which leaves the rest for one poll interval, one request's round trip (a few
# ms on loopback) and CPU jitter on a busy test machine.
POLL_INTERVAL = 0.02
PROMISE = 1.0


async def refused_at(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str],
                     refused: int, **kwargs: Any) -> float:
    """The monotonic time ``client`` first answers ``refused``; until then it must answer 2xx."""
    deadline = time.monotonic() + PROMISE + 30
    while True:
        response = await client.request(method, path, headers=headers, **kwargs)
        if response.status_code == refused:
            return time.monotonic()
        assert response.status_code < 300, response.text
        assert time.monotonic() < deadline, f"{method} {path} never answered {refused}"
        await asyncio.sleep(POLL_INTERVAL)


@pytest.mark.slow
class TestAcrossProcesses:
    """Two ``atrium serve`` processes on PostgreSQL + Redis: a revocation made through one (or by
    the CLI) reaches the other within 1 s (``auth_cache_seconds`` is 0.5 s by default)."""

    async def test_revocations_reach_the_other_process_within_a_second(
        self, pg_database_factory: Any, tmp_path: Path
    ) -> None:
        delays: dict[str, list[float]] = {}
        async with production_pair(pg_database_factory, tmp_path) as (a, b, cli):

            async def after_cli(args: tuple[str, ...], method: str, path: str, headers: dict[str, str],
                                refused: int, **kwargs: Any) -> float:
                """Poll B while the CLI runs: seconds from the CLI's exit (its commit and cache
                invalidation are done by then) to B's refusal; <= 0 when B refused first."""
                polling = asyncio.create_task(refused_at(b, method, path, headers, refused, **kwargs))
                await cli(*args)
                done = time.monotonic()
                return await polling - done

            # Logout through A, five times, each a while into B's cache window: B refuses the token.
            _, body = await account(a)
            for _ in range(5):
                headers = bearer((await login(a, body))["access_token"])
                assert (await b.get(ME, headers=headers)).status_code == 200  # B has it cached now
                await asyncio.sleep(0.3)
                assert (await a.post(LOGOUT, headers=headers)).status_code == 204
                done = time.monotonic()
                delays.setdefault("logout", []).append(await refused_at(b, "GET", ME, headers, 401) - done)

            # A rotated refresh token presented to B again: the session ends in A too.
            pair = await login(a, body)
            headers = bearer((await refresh(a, pair["refresh_token"])).json()["access_token"])
            assert (await a.get(ME, headers=headers)).status_code == 200
            assert_envelope(await refresh(b, pair["refresh_token"]), 401, "refresh_token_reused")
            done = time.monotonic()
            delays["refresh reuse"] = [await refused_at(a, "GET", ME, headers, 401) - done]

            # The CLI demotes an admin while B is serving the admin's token.
            admin_body = signup_body(email=unique_email("admin"))
            assert (await a.post(USERS, json=admin_body)).status_code == 201
            assert "administrator" in await cli("set-admin", admin_body["email"])
            admin = bearer((await login(a, admin_body))["access_token"])
            item = {"name": "Cross-process lamp", "description": "d", "price": 100, "currency": "EUR"}
            delays["set-admin --revoke"] = [await after_cli(
                ("set-admin", admin_body["email"], "--revoke"), "POST", ITEMS, admin, 403, json=item)]

            # The CLI disables an account while B is serving its token.
            headers = bearer((await login(a, body))["access_token"])
            delays["disable-user"] = [
                await after_cli(("disable-user", body["email"]), "GET", ME, headers, 401)]
            assert_envelope(await b.get(ME, headers=headers), 401, "account_disabled")

        print("revocation delays in seconds:",
              json.dumps({k: [round(v, 3) for v in vs] for k, vs in delays.items()}))
        worst = max(v for vs in delays.values() for v in vs)
        assert worst <= PROMISE, delays


class TestWithoutAccounts:
    async def test_every_bearer_token_is_refused_and_start_up_says_so(self, tmp_path: Path) -> None:
        app = create_app(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'items.db'}",
                                       modules=("items",)))
        warnings: list[str] = []
        sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
        try:
            async with serve(app) as client:
                assert app.state.container.authority() is None
                token = app.state.container.tokens().issue(AccessClaims(uuid.uuid4(), uuid.uuid4()))
                item = {"name": "Nobody's lamp", "description": "d", "price": 100, "currency": "EUR"}
                refused = await client.post(ITEMS, json=item, headers=bearer(token))
                assert_envelope(refused, 401, "invalid_token")
                assert (await client.get(ITEMS)).status_code == 200  # public routes still answer
        finally:
            logger.remove(sink)
        assert sum("no enabled module provides 'authority'" in w for w in warnings) == 1

    def test_two_modules_cannot_both_own_the_accounts(self) -> None:
        [users] = load_modules(["users"])
        twin = dataclasses.replace(users, name="accounts", router=None, models=(), subscriptions={})
        with pytest.raises(ModuleError, match="only one module"):
            build_container(make_settings(), [users, twin])

    def test_the_users_module_provides_it(self) -> None:
        container = build_container(make_settings())
        assert container.authority() is container.users.authority()
