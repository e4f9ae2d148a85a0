"""Users and tokens through the HTTP API: sign-ups, logins, admins, auth headers."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from core.db.session import UnitOfWork
from tests.support.stack import Stack


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
