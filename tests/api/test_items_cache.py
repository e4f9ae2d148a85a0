"""The item cache through whole apps: two processes on one Redis, a dead Redis, a cold key under
load, a write racing a slow read, and the cache turned off.

Each test builds its own app(s) with ``create_app(settings)`` instead of using ``stack``, so it can
pick the cache backend and look inside the container (the service's loader, the metrics registry).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.db.session import UnitOfWork
from main import create_app
from tests.support.api import bearer, login, unique_email
from tests.support.db import migrated
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, make_settings
from tests.support.stack import serve

ITEMS = "/api/v1/items"
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once


def counter(app: FastAPI, result: str) -> float:
    value = app.state.metrics_registry.get_sample_value(
        "atrium_cache_requests_total", {"cache": "items", "result": result}
    )
    return value or 0.0


async def admin_headers(app: FastAPI, client: httpx.AsyncClient) -> dict[str, str]:
    email, password = unique_email("admin"), "admin password 123"
    async with UnitOfWork(app.state.container.sessions()) as session:
        await app.state.container.users.service().create_admin(session, email, password, "Root Admin")
    return bearer(await login(client, email, password))


async def new_item(client: httpx.AsyncClient, headers: dict[str, str], price: int = 1000) -> dict[str, Any]:
    body = {"name": f"cached-{uuid.uuid4().hex[:8]}", "price": price, "currency": "EUR"}
    response = await client.post(ITEMS, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def count_loads(
    app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
) -> list[uuid.UUID]:
    """Wrap the item service's database loader; returns the list of ids it was called for."""
    service = app.state.container.items.service()
    real = service._load_json
    calls: list[uuid.UUID] = []

    async def load(item_id: uuid.UUID) -> bytes | None:
        calls.append(item_id)
        if before is not None:
            await before()
        value = await real(item_id)
        if after is not None:
            await after()
        return value

    monkeypatch.setattr(service, "_load_json", load)
    return calls


# Items run no jobs: without the in-process worker an app also stops at once.
QUICK = {**CHEAP_HASHING, "run_worker_in_process": False}


def sqlite_settings(tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'items.db'}", **QUICK, **overrides)


@pytest.fixture
async def redis_namespace() -> AsyncIterator[str]:
    require("redis")
    namespace = f"atrium-test-items-{uuid.uuid4().hex[:10]}"
    yield namespace
    await flush_redis_namespace(namespace)


class TestTwoProcessesOneRedis:
    async def test_a_write_through_one_is_seen_by_the_other_at_once(
        self, pg_database_factory: Callable[[], Awaitable[str]], redis_namespace: str
    ) -> None:
        url = await migrated(await pg_database_factory())
        settings = make_settings(database_url=url, cache_backend="redis", redis_url=REDIS_URL,
                                 cache_namespace=redis_namespace, auto_migrate=False, **QUICK)
        app_a, app_b = create_app(settings), create_app(settings)
        async with serve(app_a) as a, serve(app_b) as b:
            headers = await admin_headers(app_a, a)
            item = await new_item(a, headers, price=1)
            path = f"{ITEMS}/{item['id']}"
            for price in range(2, 7):
                warm = await b.get(path)
                hits = counter(app_b, "hit")
                assert (await b.get(path)).json() == warm.json()
                assert counter(app_b, "hit") == hits + 1, "B did not serve the item from the cache"
                changed = await a.patch(path, json={"price": price}, headers=headers)
                assert changed.status_code == 200
                seen = await b.get(path)
                assert seen.json()["price"] == price
                assert seen.json() == changed.json()
                assert seen.headers["etag"] != warm.headers["etag"]
            deleted = await a.delete(path, headers=headers)
            assert deleted.status_code == 204
            await b.get(path)
            assert (await b.get(path)).status_code == 404


class TestRedisDown:
    async def test_reads_come_from_the_database_and_errors_are_counted(self, tmp_path: Path) -> None:
        app = create_app(sqlite_settings(tmp_path, cache_backend="redis", redis_url=DEAD_REDIS))
        async with serve(app) as client:
            headers = await admin_headers(app, client)
            item = await new_item(client, headers)
            started = time.monotonic()
            responses = [await client.get(f"{ITEMS}/{item['id']}") for _ in range(10)]
            assert time.monotonic() - started < 5
            assert [r.status_code for r in responses] == [200] * 10
            assert all(r.json() == item for r in responses)
            assert len({r.headers["etag"] for r in responses}) == 1
            assert counter(app, "error") >= 1
            assert counter(app, "bypass") >= 1
            assert counter(app, "error") + counter(app, "bypass") == 10
            assert counter(app, "hit") == 0

            changed = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 7}, headers=headers)
            assert changed.status_code == 200  # the failed invalidation does not fail the write
            assert (await client.get(f"{ITEMS}/{item['id']}")).json()["price"] == 7
            missing = await client.get(f"{ITEMS}/{uuid.uuid4()}")
            assert missing.status_code == 404


class TestStampede:
    @pytest.mark.parametrize("backend", ["memory", "redis"])
    async def test_a_cold_key_is_loaded_once_for_fifty_concurrent_reads(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
    ) -> None:
        namespace = f"atrium-test-items-{uuid.uuid4().hex[:10]}"
        if backend == "redis":
            require("redis")
        app = create_app(sqlite_settings(tmp_path, cache_backend=backend, redis_url=REDIS_URL,
                                         cache_namespace=namespace))
        try:
            async with serve(app) as client:
                item = await new_item(client, await admin_headers(app, client))

                async def slow() -> None:
                    await asyncio.sleep(0.2)

                loads = count_loads(app, monkeypatch, before=slow)
                responses = await asyncio.gather(*(client.get(f"{ITEMS}/{item['id']}") for _ in range(50)))
                assert [r.status_code for r in responses] == [200] * 50
                assert len({r.content for r in responses}) == 1
                assert len({r.headers["etag"] for r in responses}) == 1
                assert responses[0].json() == item
                assert len(loads) == 1, f"the database was read {len(loads)} times for one cold key"
                assert counter(app, "miss") == 50  # every request missed; one of them loaded
                assert (await client.get(f"{ITEMS}/{item['id']}")).status_code == 200
                assert len(loads) == 1  # and now it is warm
                assert counter(app, "hit") == 1
        finally:
            if backend == "redis":
                await flush_redis_namespace(namespace)

    async def test_a_failing_load_fails_every_waiter_and_the_next_read_retries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        app = create_app(sqlite_settings(tmp_path))
        async with serve(app) as client:
            item = await new_item(client, await admin_headers(app, client))
            failures = [True]

            async def explode() -> None:
                await asyncio.sleep(0.05)
                if failures.pop() if failures else False:
                    raise ConnectionRefusedError("database went away")

            loads = count_loads(app, monkeypatch, before=explode)
            responses = await asyncio.gather(*(client.get(f"{ITEMS}/{item['id']}") for _ in range(10)))
            assert len(loads) == 1
            assert {r.status_code for r in responses} == {503}
            again = await client.get(f"{ITEMS}/{item['id']}")
            assert again.status_code == 200
            assert len(loads) == 2


class TestWriteDuringASlowRead:
    """A read loads the old row, then a write commits and invalidates, then the read finishes."""

    @pytest.fixture
    async def racing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> AsyncIterator[dict[str, Any]]:
        app = create_app(sqlite_settings(tmp_path, cache_backend="memory"))
        async with serve(app) as client:
            headers = await admin_headers(app, client)
            item = await new_item(client, headers, price=100)
            loaded, release = asyncio.Event(), asyncio.Event()
            first = [True]

            async def hold_the_first_load() -> None:
                if first:
                    first.clear()
                    loaded.set()  # it has read the OLD row ...
                    await release.wait()  # ... and is slow to store it

            count_loads(app, monkeypatch, after=hold_the_first_load)
            slow = asyncio.create_task(client.get(f"{ITEMS}/{item['id']}"))
            await asyncio.wait_for(loaded.wait(), 5)
            patched = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 200}, headers=headers)
            assert patched.status_code == 200
            try:
                yield {"client": client, "item": item, "slow": slow, "release": release}
            finally:
                release.set()
                await slow

    async def test_the_stale_value_is_not_stored(self, racing: dict[str, Any]) -> None:
        client, item = racing["client"], racing["item"]
        racing["release"].set()
        slow = await racing["slow"]
        assert slow.status_code == 200
        assert slow.json()["price"] == 100  # it began before the write: the old value is fine
        for _ in range(3):
            assert (await client.get(f"{ITEMS}/{item['id']}")).json()["price"] == 200

    async def test_a_read_that_starts_after_the_write_sees_the_new_value(
        self, racing: dict[str, Any]
    ) -> None:
        """Regression: single flight once keyed loads by cache key only, so this read joined the
        load begun before the write and returned the old value."""
        client, item = racing["client"], racing["item"]
        later = asyncio.create_task(client.get(f"{ITEMS}/{item['id']}"))
        await asyncio.sleep(0.05)  # it is waiting now (on the slow read's load)
        racing["release"].set()
        await racing["slow"]
        response = await later
        assert response.status_code == 200
        assert response.json()["price"] == 200


class TestCacheOff:
    async def test_every_read_goes_to_the_database_and_still_has_an_etag(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("ATRIUM_CACHE_BACKEND", "none")
        settings = sqlite_settings(tmp_path)
        assert settings.cache_backend == "none"
        app = create_app(settings)
        async with serve(app) as client:
            headers = await admin_headers(app, client)
            item = await new_item(client, headers)
            loads = count_loads(app, monkeypatch)
            responses = [await client.get(f"{ITEMS}/{item['id']}") for _ in range(3)]
            assert [r.status_code for r in responses] == [200] * 3
            assert all(r.json() == item for r in responses)
            etag = responses[0].headers["etag"]
            assert {r.headers["etag"] for r in responses} == {etag}
            assert len(loads) == 3
            unchanged = await client.get(f"{ITEMS}/{item['id']}", headers={"If-None-Match": etag})
            assert unchanged.status_code == 304
            changed = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 5}, headers=headers)
            assert changed.status_code == 200
            assert (await client.get(f"{ITEMS}/{item['id']}")).json()["price"] == 5
            assert counter(app, "hit") == 0
            assert counter(app, "miss") == 5
