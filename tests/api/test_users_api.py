"""The users HTTP contract (DESIGN.md §5), on both profiles."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest

from core.security import AccessClaims, TokenService
from tests.support.api import bearer, make_admin, sign_up, signup_body, unique_email
from tests.support.envelope import assert_envelope
from tests.support.settings import TEST_SECRET
from tests.support.stack import Stack
from tests.support.waiting import eventually

USERS = "/api/v1/users"
TOKEN = "/api/v1/auth/token"


class TestSignUp:
    async def test_creates_the_user_and_hides_the_password(self, client: httpx.AsyncClient) -> None:
        body = signup_body(email=unique_email().upper())
        response = await client.post(USERS, json=body)
        assert response.status_code == 201, response.text
        user = response.json()
        assert set(user) == {"id", "email", "full_name", "age", "is_admin", "created_at"}
        assert user["email"] == body["email"].lower()
        assert user["full_name"] == "Ada Lovelace"
        assert user["age"] == 36
        assert user["is_admin"] is False
        uuid.UUID(user["id"])
        assert body["password"] not in response.text

    async def test_duplicate_email_is_409_whatever_the_case(self, client: httpx.AsyncClient) -> None:
        body = signup_body()
        assert (await client.post(USERS, json=body)).status_code == 201
        again = await client.post(USERS, json={**body, "email": body["email"].upper()})
        assert_envelope(again, 409, "email_taken")

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("email", "not-an-email"),
            ("password", "short"),
            ("age", 17),
            ("age", "twenty"),
            ("full_name", "   "),
            ("password", "x" * 129),
        ],
    )
    async def test_invalid_field_is_422_naming_it(
        self, client: httpx.AsyncClient, field: str, value: object
    ) -> None:
        response = await client.post(USERS, json=signup_body(**{field: value}))
        error = assert_envelope(response, 422, "validation_error")
        locations = [e["loc"] for e in error["details"]["errors"]]
        assert ["body", field] in locations

    async def test_missing_fields_are_each_reported(self, client: httpx.AsyncClient) -> None:
        error = assert_envelope(await client.post(USERS, json={}), 422, "validation_error")
        missing = {e["loc"][-1] for e in error["details"]["errors"] if e["type"] == "missing"}
        assert missing == {"email", "password", "full_name", "age"}

    async def test_validation_errors_never_echo_the_password(self, client: httpx.AsyncClient) -> None:
        response = await client.post(USERS, json=signup_body(password="secret7", age=3))
        assert response.status_code == 422
        assert "secret7" not in response.text

    async def test_malformed_json_is_400(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            USERS, content=b'{"email": ', headers={"content-type": "application/json"}
        )
        assert_envelope(response, 400, "invalid_json")

    async def test_a_json_array_is_422(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.post(USERS, json=[1, 2]), 422, "validation_error")

    async def test_welcome_email_is_sent_once_by_a_job(self, stack: Stack) -> None:
        body = signup_body()
        assert (await stack.client.post(USERS, json=body)).status_code == 201
        mail = await stack.wait_for_mail(body["email"])
        assert mail.subject == "Welcome to Atrium"
        assert "Ada" in mail.body
        await eventually(lambda: stack.mail_count(body["email"]) >= 1)
        assert stack.mail_count(body["email"]) == 1
        if stack.worker_log is not None:  # production: the worker process did it, and logged it
            await eventually(lambda: "users.send_welcome_email done" in stack.worker_log.read_text())

    async def test_a_rejected_signup_sends_no_email(self, stack: Stack) -> None:
        body = signup_body()
        assert (await stack.client.post(USERS, json=body)).status_code == 201
        await stack.wait_for_mail(body["email"])
        assert (await stack.client.post(USERS, json=body)).status_code == 409
        other = signup_body()
        assert (await stack.client.post(USERS, json=other)).status_code == 201
        await stack.wait_for_mail(other["email"])  # later mail arrived, so the 409's would have too
        assert stack.mail_count(body["email"]) == 1


class TestToken:
    async def test_issues_a_bearer_token(self, client: httpx.AsyncClient) -> None:
        body = signup_body()
        await client.post(USERS, json=body)
        response = await client.post(
            TOKEN, data={"username": body["email"].upper(), "password": body["password"]}
        )
        assert response.status_code == 200, response.text
        token = response.json()
        assert token["token_type"] == "bearer"
        assert token["expires_in"] == 900
        me = await client.get(f"{USERS}/me", headers=bearer(token["access_token"]))
        assert me.json()["email"] == body["email"]

    async def test_wrong_password_and_unknown_email_look_the_same(self, client: httpx.AsyncClient) -> None:
        body = signup_body()
        await client.post(USERS, json=body)
        wrong = await client.post(TOKEN, data={"username": body["email"], "password": "not the password"})
        unknown = await client.post(TOKEN, data={"username": unique_email(), "password": body["password"]})
        assert assert_envelope(wrong, 401, "invalid_credentials") == assert_envelope(
            unknown, 401, "invalid_credentials"
        )

    async def test_missing_form_fields_are_422(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.post(TOKEN, data={"username": "a@b.co"}), 422, "validation_error")

    async def test_json_instead_of_form_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post(TOKEN, json={"username": "a@b.co", "password": "x"})
        assert_envelope(response, 422, "validation_error")


def session_of(token: str) -> AccessClaims:
    """The user and session an access token names (its signature not checked)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return AccessClaims(uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"]))


def _forge(claims: dict, header: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


class TestMe:
    async def test_returns_the_caller(self, client: httpx.AsyncClient) -> None:
        user, token = await sign_up(client)
        response = await client.get(f"{USERS}/me", headers=bearer(token))
        assert response.status_code == 200
        assert response.json() == user

    async def test_without_a_token_is_401_with_a_challenge(self, client: httpx.AsyncClient) -> None:
        response = await client.get(f"{USERS}/me")
        assert_envelope(response, 401, "not_authenticated")
        assert response.headers["www-authenticate"] == "Bearer"

    @pytest.mark.parametrize("token", ["garbage", "a.b.c", ""])
    async def test_garbage_token_is_401(self, client: httpx.AsyncClient, token: str) -> None:
        response = await client.get(f"{USERS}/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401

    async def test_expired_token_is_401(self, client: httpx.AsyncClient) -> None:
        _, token = await sign_up(client)
        live = session_of(token)  # the session is live: only the expiry refuses the token
        past = TokenService(TEST_SECRET, 60, clock=lambda: datetime.now(UTC) - timedelta(hours=2))
        expired = await client.get(f"{USERS}/me", headers=bearer(past.issue(live)))
        assert_envelope(expired, 401, "invalid_token")
        assert (await client.get(f"{USERS}/me", headers=bearer(token))).status_code == 200

    async def test_alg_none_token_is_401(self, client: httpx.AsyncClient) -> None:
        _, token = await sign_up(client)
        live = session_of(token)
        now = int(datetime.now(UTC).timestamp())
        claims = {"sub": str(live.user_id), "sid": str(live.session_id), "iss": "atrium", "iat": now,
                  "exp": now + 600}
        forged = _forge(claims, {"alg": "none", "typ": "JWT"})
        assert_envelope(await client.get(f"{USERS}/me", headers=bearer(forged)), 401, "invalid_token")

    async def test_token_signed_with_another_secret_is_401(self, client: httpx.AsyncClient) -> None:
        _, token = await sign_up(client)
        forged = TokenService("another-secret-" + "x" * 32, 600).issue(session_of(token))
        assert_envelope(await client.get(f"{USERS}/me", headers=bearer(forged)), 401, "invalid_token")

    async def test_a_token_of_a_session_nobody_opened_is_401(self, client: httpx.AsyncClient) -> None:
        user, _ = await sign_up(client)
        unknown = TokenService(TEST_SECRET, 600).issue(AccessClaims(uuid.UUID(user["id"]), uuid.uuid4()))
        assert_envelope(await client.get(f"{USERS}/me", headers=bearer(unknown)), 401, "invalid_token")


class TestHostileInput:
    """Text with control characters and integers beyond a column: 422 at the edge, never a 500 from
    the database, and nothing written."""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("full_name", "Ada\x00Lovelace"),
            ("full_name", "Ada\nLovelace"),
            ("full_name", "Ada\x7fLovelace"),
            ("password", "correct\x00horse battery"),
            ("password", "correct\thorse battery"),
            ("password", "correct\x85horse battery"),
            ("email", "ada\x00@example.com"),
            ("age", 2**31),
            ("age", 2**63),
            ("age", -(2**31) - 1),
        ],
    )
    async def test_sign_up_refuses_it_and_writes_nothing(
        self, client: httpx.AsyncClient, field: str, value: object
    ) -> None:
        body = signup_body()
        response = await client.post(USERS, json={**body, field: value})
        error = assert_envelope(response, 422, "validation_error")
        assert ["body", field] in [e["loc"] for e in error["details"]["errors"]]
        assert (await client.post(USERS, json=body)).status_code == 201  # the email was not taken

    @pytest.mark.parametrize(
        "form",
        [
            {"username": "ada\x00@example.com", "password": "correct horse battery"},
            {"username": "ada@example.com", "password": "correct\x00horse battery"},
            {"username": "a" * 321, "password": "correct horse battery"},
            {"username": "ada@example.com", "password": "p" * 129},
        ],
    )
    async def test_login_refuses_it_with_422(self, client: httpx.AsyncClient, form: dict[str, str]) -> None:
        assert_envelope(await client.post(TOKEN, data=form), 422, "validation_error")

    async def test_a_password_may_hold_any_printable_character(self, client: httpx.AsyncClient) -> None:
        password = "Pässwörd mit Leerzeichen ✓ «»"
        body = signup_body(password=password)
        assert (await client.post(USERS, json=body)).status_code == 201
        response = await client.post(TOKEN, data={"username": body["email"], "password": password})
        assert response.status_code == 200, response.text


class TestGetUser:
    async def test_self_is_visible(self, client: httpx.AsyncClient) -> None:
        user, token = await sign_up(client)
        response = await client.get(f"{USERS}/{user['id']}", headers=bearer(token))
        assert response.status_code == 200
        assert response.json()["id"] == user["id"]

    async def test_another_user_is_404(self, client: httpx.AsyncClient) -> None:
        _, token = await sign_up(client)
        other, _ = await sign_up(client)
        assert_envelope(await client.get(f"{USERS}/{other['id']}", headers=bearer(token)), 404, "not_found")

    async def test_admin_sees_anyone(self, stack: Stack) -> None:
        other, _ = await sign_up(stack.client)
        admin_token = await make_admin(stack)
        response = await stack.client.get(f"{USERS}/{other['id']}", headers=bearer(admin_token))
        assert response.status_code == 200
        assert response.json()["email"] == other["email"]
        me = await stack.client.get(f"{USERS}/me", headers=bearer(admin_token))
        assert me.json()["is_admin"] is True

    async def test_unknown_id_is_404_even_for_an_admin(self, stack: Stack) -> None:
        admin_token = await make_admin(stack)
        response = await stack.client.get(f"{USERS}/{uuid.uuid4()}", headers=bearer(admin_token))
        assert_envelope(response, 404, "not_found")

    async def test_malformed_id_is_422(self, client: httpx.AsyncClient) -> None:
        _, token = await sign_up(client)
        assert_envelope(
            await client.get(f"{USERS}/not-a-uuid", headers=bearer(token)), 422, "validation_error"
        )

    async def test_without_a_token_is_401(self, client: httpx.AsyncClient) -> None:
        assert (await client.get(f"{USERS}/{uuid.uuid4()}")).status_code == 401
