"""A backing service that is down gives 503 envelopes, never a 500 or a hang."""

from __future__ import annotations

import time

from main import create_app
from tests.support.envelope import assert_envelope
from tests.support.settings import make_settings
from tests.support.stack import serve

CLOSED_PORT = 1  # nothing listens on tcpmux here; connections are refused at once


class TestDatabaseDown:
    async def test_requests_needing_the_database_get_503(self, tmp_path: object) -> None:
        settings = make_settings(
            database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{CLOSED_PORT}/atrium",
            auto_migrate=False,
            database_pool_timeout=1.0,
        )
        async with serve(create_app(settings)) as client:
            started = time.monotonic()
            response = await client.post(
                "/api/v1/auth/token", data={"username": "a@b.co", "password": "x" * 8}
            )
            assert time.monotonic() - started < 5
            assert_envelope(response, 503, "service_unavailable")
            assert response.headers["retry-after"] == "1"

            ready = await client.get("/health/ready")
            error = assert_envelope(ready, 503, "not_ready")
            assert error["details"]["checks"]["database"]["status"] == "down"
            assert error["details"]["checks"]["cache"]["status"] == "ok"
            assert "database" in error["message"]

            assert (await client.get("/health/live")).status_code == 200


class TestCacheDown:
    async def test_readiness_names_the_cache(self, tmp_path: object) -> None:
        settings = make_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/cache-down.db",
            cache_backend="redis",
            redis_url=f"redis://127.0.0.1:{CLOSED_PORT}/0",
        )
        async with serve(create_app(settings)) as client:
            error = assert_envelope(await client.get("/health/ready"), 503, "not_ready")
            checks = error["details"]["checks"]
            assert checks["cache"]["status"] == "down"
            assert checks["database"]["status"] == "ok"
            assert checks["broker"]["status"] == "ok"
            signup = await client.post(
                "/api/v1/users",
                json={"email": "c@example.com", "password": "password1", "full_name": "C", "age": 20},
            )
            assert signup.status_code == 201  # users does not need the cache


class TestBrokerDown:
    async def test_signup_succeeds_and_the_event_waits_in_the_outbox(self, tmp_path: object) -> None:
        settings = make_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/broker-down.db",
            broker_backend="redis",
            broker_url=f"redis://127.0.0.1:{CLOSED_PORT}/0",
            run_worker_in_process=False,
        )
        app = create_app(settings)
        async with serve(app) as client:
            response = await client.post(
                "/api/v1/users",
                json={"email": "d@example.com", "password": "password1", "full_name": "D", "age": 20},
            )
            assert response.status_code == 201
            ready = assert_envelope(await client.get("/health/ready"), 503, "not_ready")
            assert ready["details"]["checks"]["broker"]["status"] == "down"

            from sqlalchemy import select

            from core.messaging.outbox import OutboxMessage

            async with app.state.sessions() as session:
                rows = (await session.scalars(select(OutboxMessage))).all()
            assert [r.name for r in rows] == ["users.UserRegistered"]
            assert rows[0].published_at is None
