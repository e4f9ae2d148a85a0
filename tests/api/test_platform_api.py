"""Platform behaviour through the real app: errors, health, metrics, request ids, overrides."""

from __future__ import annotations

import re

import httpx
from dependency_injector import providers

from tests.support.api import bearer, sign_up
from tests.support.envelope import assert_envelope
from tests.support.stack import Stack


class TestErrors:
    async def test_unknown_route_is_a_404_envelope(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.get("/api/v1/nowhere"), 404, "not_found")

    async def test_wrong_method_is_a_405_envelope(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.delete("/api/v1/users/me"), 405, "method_not_allowed")

    async def test_unexpected_exception_is_a_500_envelope_without_internals(self, stack: Stack) -> None:
        class Exploding:
            async def me(self, *_: object) -> None:
                raise RuntimeError("secret internal detail")

        _, token = await sign_up(stack.client)
        with stack.container.users.service.override(providers.Object(Exploding())):
            response = await stack.client.get("/api/v1/users/me", headers=bearer(token))
        error = assert_envelope(response, 500, "internal_error")
        assert "secret internal detail" not in response.text
        assert error["message"] == "An unexpected error occurred."
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


class TestOverride:
    async def test_an_overridden_provider_is_what_the_app_uses(self, stack: Stack) -> None:
        real = stack.container.users.service()

        class Spy:
            calls = 0

            async def me(self, session: object, principal: object) -> object:
                Spy.calls += 1
                return await real.me(session, principal)

        user, token = await sign_up(stack.client)
        with stack.container.users.service.override(providers.Object(Spy())):
            response = await stack.client.get("/api/v1/users/me", headers=bearer(token))
        assert response.json()["id"] == user["id"]
        assert Spy.calls == 1
        await stack.client.get("/api/v1/users/me", headers=bearer(token))
        assert Spy.calls == 1  # the override is gone after the block


class TestHealth:
    async def test_live(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/live")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    async def test_ready_checks_database_cache_and_broker(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/ready")
        assert response.status_code == 200, response.text
        checks = response.json()["checks"]
        assert set(checks) == {"database", "cache", "broker"}
        assert all(c["status"] == "ok" for c in checks.values())


class TestMetrics:
    async def test_requests_are_counted_by_route_template(self, client: httpx.AsyncClient) -> None:
        await client.get("/api/v1/users/me")
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert re.search(
            r'http_requests_total\{handler="/api/v1/users/me",method="GET",status="401"\} \d', response.text
        )
        assert "process_cpu_seconds_total" in response.text


class TestRequestId:
    async def test_a_well_formed_id_is_echoed(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/live", headers={"X-Request-ID": "trace-1234-abcd"})
        assert response.headers["x-request-id"] == "trace-1234-abcd"

    async def test_a_malformed_id_is_replaced(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])

    async def test_every_response_has_one(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v1/nowhere")
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
