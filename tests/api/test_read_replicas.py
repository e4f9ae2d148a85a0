"""Read replicas, against a REAL streaming replica.

A private PostgreSQL primary (``initdb`` in a temporary directory) and a hot standby of it made
with ``pg_basebackup -R`` stream WAL to each other; the app runs with ``database_url`` = the
primary and ``database_replica_urls`` = the standby. Pausing WAL replay on the standby
(``pg_wal_replay_pause()``) freezes what it shows, so a read that went to the replica can be told
from one that went to the primary by what it sees. Every statement the app sends is also recorded
per engine, and each session factory is asked which server it reached (``pg_is_in_recovery()``,
``inet_server_port()``).

Routing (README "Read replicas"): ``GET /items`` and ``GET /users/{id}`` read a replica (a user
the replica does not have yet is confirmed on the primary); writes, ``GET /users/me``, billing
reads and the item cache's fills read the primary.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from loguru import logger
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import create_engine
from core.db.replicas import ReadSessions
from core.db.session import UnitOfWork
from main import create_app
from tests.support.api import bearer, login, sign_up
from tests.support.db import migrated
from tests.support.pg_cluster import PgCluster, require_pg_cluster
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, make_settings
from tests.support.stack import serve
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ITEMS = "/api/v1/items"


@dataclass
class Replicated:
    primary: PgCluster
    replica: PgCluster
    client: httpx.AsyncClient
    container: Any
    admin: dict[str, str]

    @property
    def primary_engine(self) -> AsyncEngine:
        return self.container.engine()

    @property
    def replica_engine(self) -> AsyncEngine:
        [engine] = self.container.replica_engines()
        return engine

    async def caught_up(self) -> None:
        await self.replica.wait_caught_up(self.primary)


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[Replicated]:
    require_pg_cluster()
    primary = PgCluster("primary")
    try:
        primary.init().start()
        replica = primary.replica("replica")  # a hot standby, streaming from the primary
        url = await primary.create_database("atrium")
        await migrated(url)  # the standby follows the schema by streaming, like any other write
        await replica.wait_caught_up(primary)
        settings = make_settings(
            database_url=url,
            database_replica_urls=(replica.url("atrium"),),
            database_replica_cooloff=0.5,
            database_pool_timeout=2.0,
            database_connect_timeout=2.0,
            auto_migrate=False,
            **CHEAP_HASHING,
            **GENEROUS_RATE_LIMITS,
        )
        app = create_app(settings)
        async with serve(app) as client:
            container = app.state.container
            email, password = f"admin-{uuid.uuid4().hex[:8]}@example.com", "admin password 123"
            async with UnitOfWork(container.sessions()) as session:
                await container.users.service().create_admin(session, email, password, "Root Admin")
            admin = bearer(await login(client, email, password))
            yield Replicated(primary, replica, client, container, admin)
    finally:
        primary.cleanup()  # and its replica


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement sent through ``engine`` while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def touches(seen: list[str], table: str) -> bool:
    return any(table in statement for statement in seen)


async def new_item(env: Replicated, name: str) -> dict[str, Any]:
    response = await env.client.post(ITEMS, json={"name": name, "price": 990, "currency": "EUR"},
                                      headers=env.admin)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def listed(env: Replicated, name: str) -> list[str]:
    response = await env.client.get(ITEMS, params={"q": name})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def where(session_sql: Any) -> tuple[bool, int]:
    row = (await session_sql.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
    return bool(row[0]), int(row[1])


# --- each factory reaches its server ------------------------------------------------------------


async def test_each_session_factory_reaches_its_server(env: Replicated) -> None:
    read_sessions: ReadSessions = env.container.read_sessions()
    assert read_sessions.replicated

    async with env.container.sessions()() as session:
        assert await where(session) == (False, env.primary.port)  # the primary, read-write
        assert (await session.execute(text("SHOW transaction_read_only"))).scalar() == "off"

    session = await read_sessions.open()
    try:
        assert await where(session) == (True, env.replica.port)  # the standby, in recovery
        assert (await session.execute(text("SHOW transaction_read_only"))).scalar() == "on"
    finally:
        await session.close()

    # The replica's server sees the app's read connection too.
    with statements(env.replica_engine) as seen:
        assert (await env.client.get(ITEMS)).status_code == 200
    assert touches(seen, "items"), seen
    backends = await env.replica.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'atrium' AND backend_type = 'client backend'"
    )
    assert backends >= 1


async def test_reads_go_round_robin_and_skip_a_replica_that_is_down(env: Replicated) -> None:
    second = await asyncio.to_thread(env.primary.replica, "replica-2")
    engines = [create_engine(replica.url("atrium"), connect_timeout=2.0) for replica in (env.replica, second)]
    read_sessions = ReadSessions(env.container.sessions(), engines, cooloff=60)

    async def ports(count: int) -> list[int]:
        seen = []
        for _ in range(count):
            session = await read_sessions.open()
            try:
                seen.append((await where(session))[1])
            finally:
                await session.close()
        return seen

    try:
        assert sorted(await ports(4)) == sorted([env.replica.port, second.port] * 2)
        assert len(set((await ports(4))[::2])) == 1  # alternating, not random
        await asyncio.to_thread(second.stop, "fast")
        assert await ports(4) == [env.replica.port] * 4  # the other replica, not the primary
    finally:
        for engine in engines:
            await engine.dispose()
        await asyncio.to_thread(second.cleanup)


# --- reads that may lag, reads that may not ----------------------------------------------------


async def test_replica_routed_reads_lag_while_primary_routed_reads_see_the_write(env: Replicated) -> None:
    await env.caught_up()
    name = f"Lagging {uuid.uuid4().hex[:8]}"
    await env.replica.pause_replay()
    try:
        with statements(env.primary_engine) as on_primary, statements(env.replica_engine) as on_replica:
            item = await new_item(env, name)  # committed on the primary, not yet replayed

            # GET /items reads the replica: the new item is not there yet.
            assert await listed(env, name) == []
            # GET /items/{id} fills the cache from the primary: the admin sees what they just wrote.
            read = await env.client.get(f"{ITEMS}/{item['id']}")
            assert read.status_code == 200
            assert read.json()["name"] == name

            # A signup and the reads of that account right after it.
            user, token = await sign_up(env.client)
            me = await env.client.get("/api/v1/users/me", headers=bearer(token))  # the primary
            assert me.status_code == 200
            assert me.json()["id"] == user["id"]
            # GET /users/{id} asks the replica first; it does not have the user, the primary does.
            by_id = await env.client.get(f"/api/v1/users/{user['id']}", headers=bearer(token))
            assert by_id.status_code == 200
            assert by_id.json()["email"] == user["email"]
            admin_view = await env.client.get(f"/api/v1/users/{user['id']}", headers=env.admin)
            assert admin_view.status_code == 200
            unknown = await env.client.get(f"/api/v1/users/{uuid.uuid4()}", headers=env.admin)
            assert unknown.status_code == 404

        # Which server each path used, from the statements each engine carried.
        assert touches(on_replica, "FROM items"), on_replica
        assert touches(on_replica, "FROM users"), on_replica  # /users/{id}: tried on the replica
        assert not any(s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")) for s in on_replica)
        assert touches(on_primary, "INSERT INTO items")
        assert touches(on_primary, "INSERT INTO users")

        # Straight from the sessions: the standby does not have the user, the primary does.
        async with env.container.read_sessions()() as replica_session:
            assert (await replica_session.execute(
                text("SELECT count(*) FROM users WHERE id = :id"), {"id": user["id"]})).scalar() == 0
        async with env.container.sessions()() as primary_session:
            assert (await primary_session.execute(
                text("SELECT count(*) FROM users WHERE id = :id"), {"id": user["id"]})).scalar() == 1
    finally:
        await env.replica.resume_replay()

    # Replay resumes: the replica-routed read catches up.
    async def arrived() -> bool:
        return await listed(env, name) == [item["id"]]

    await eventually(arrived, within=10)


# --- writes never touch the replica ------------------------------------------------------------


async def test_write_paths_never_touch_the_replica(env: Replicated) -> None:
    await env.caught_up()
    await env.replica.pause_replay()  # a write must not wait for, or read from, the standby
    try:
        with statements(env.replica_engine) as on_replica, statements(env.primary_engine) as on_primary:
            item = await new_item(env, f"Written {uuid.uuid4().hex[:8]}")
            patched = await env.client.patch(f"{ITEMS}/{item['id']}", json={"price": 1290}, headers=env.admin)
            assert patched.status_code == 200, patched.text
            # The cached copy was invalidated on commit and is refilled from the primary.
            assert (await env.client.get(f"{ITEMS}/{item['id']}")).json()["price"] == 1290

            _user, token = await sign_up(env.client)
            headers = bearer(token)
            invoice = await env.client.post(
                "/api/v1/invoices", json={"lines": [{"item_id": item["id"], "quantity": 2}]}, headers=headers)
            assert invoice.status_code == 201, invoice.text
            invoice_id = invoice.json()["id"]
            # Billing reads follow the caller's own writes: they read the primary.
            own = await env.client.get(f"/api/v1/invoices/{invoice_id}", headers=headers)
            assert own.status_code == 200
            listing = (await env.client.get("/api/v1/invoices", headers=headers)).json()
            assert [i["id"] for i in listing["invoices"]] == [invoice_id]
            paid = await env.client.post(
                f"/api/v1/invoices/{invoice_id}/payments", json={"payment_token": "tok_visa"},
                headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
            assert paid.status_code == 202, paid.text
            payment = await env.client.get(f"/api/v1/payments/{paid.json()['id']}", headers=headers)
            assert payment.status_code == 200, payment.text

            async def settled() -> bool:
                found = await env.client.get(f"/api/v1/payments/{paid.json()['id']}", headers=headers)
                return bool(found.json()["status"] == "succeeded")

            await eventually(settled, within=15)  # the in-process worker's job: the primary too
            deleted = await env.client.delete(f"{ITEMS}/{item['id']}", headers=env.admin)
            assert deleted.status_code == 204
        assert on_replica == [], on_replica
        for table in ("INSERT INTO items", "UPDATE items", "INSERT INTO users", "INSERT INTO invoices",
                      "INSERT INTO payments", "UPDATE payments", "DELETE FROM items"):
            assert touches(on_primary, table), table
    finally:
        await env.replica.resume_replay()


# --- a replica that is down -----------------------------------------------------------------


async def test_a_replica_that_is_down_sends_reads_to_the_primary(env: Replicated) -> None:
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    name = f"Fallback {uuid.uuid4().hex[:8]}"
    try:
        await env.caught_up()
        item = await new_item(env, name)
        await env.caught_up()
        env.replica.stop("fast")  # connections to it are refused from now on
        with statements(env.primary_engine) as on_primary:
            for _ in range(5):
                assert await listed(env, name) == [item["id"]]  # 200 from the primary, never 503
        assert sum(1 for s in on_primary if "FROM items" in s) == 5
        assert any("read replica" in w and "unavailable" in w for w in warnings), warnings
        assert sum("unavailable" in w for w in warnings) == 1  # logged once per outage, not per read
    finally:
        logger.remove(sink)
        env.replica.start()

    # Back after its cool-off: reads go to the replica again.
    await env.caught_up()

    async def on_replica_again() -> bool:
        with statements(env.replica_engine) as seen:
            assert await listed(env, name) == [item["id"]]
        return touches(seen, "FROM items")

    await eventually(on_replica_again, within=10)
