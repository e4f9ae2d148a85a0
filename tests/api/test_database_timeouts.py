"""A database that stops answering: bounded 503s, then the same app serving again.

PostgreSQL is paused, not stopped: every process of a PRIVATE cluster is SIGSTOPped, so nothing is
refused and nothing is reset (the kernel even accepts new connections into the listen backlog); only
the client's own timeouts end a wait. Every request that needs the database must then answer 503
``service_unavailable`` within

    BOUND = pool_timeout + max(connect_timeout, statement_timeout + STATEMENT_GRACE) + SLACK

(a request may wait for a pooled connection up to ``pool_timeout``, then either connects anew, up to
``connect_timeout``, or pings/runs a statement on a pooled one, up to the command timeout), on the
stock path and on the fast path. After SIGCONT the next requests answer 2xx without restarting the
app, and neither the pool nor the server keeps a connection more than the pool holds.

On SQLite the statement timeout is the busy timeout: a write that waits for another connection's lock
gives up after it, 503 too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.db.engine import STATEMENT_GRACE, create_engine, database_unavailable, fast_path_enabled
from core.db.session import UnitOfWork
from main import create_app
from tests.support.api import bearer, login, signup_body
from tests.support.db import migrated, sqlite_dsn
from tests.support.envelope import assert_envelope
from tests.support.paused import paused
from tests.support.pg_cluster import PgCluster, require_pg_cluster
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, make_settings
from tests.support.stack import serve
from tests.support.waiting import eventually

STATEMENT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
POOL_TIMEOUT = 1.0
POOL_SIZE = 3
SLACK = 1.0  # the event loop and the two cores of a CI runner, busy with the test itself
BOUND = POOL_TIMEOUT + max(CONNECT_TIMEOUT, STATEMENT_TIMEOUT + STATEMENT_GRACE) + SLACK
PAUSED_ROUNDS = 2  # rounds of concurrent requests while the server is paused


@dataclass
class Outcome:
    kind: str
    status: int
    took: float
    response: httpx.Response


Request = Callable[[], Awaitable[httpx.Response]]


async def timed(kind: str, request: Request) -> Outcome:
    started = time.monotonic()
    response = await request()
    return Outcome(kind, response.status_code, time.monotonic() - started, response)


async def create_admin(app: Any, client: httpx.AsyncClient) -> dict[str, str]:
    container = app.state.container
    email, password = f"admin-{uuid.uuid4().hex[:8]}@example.com", "admin password 123"
    async with UnitOfWork(container.sessions()) as session:
        await container.users.service().create_admin(session, email, password, "Root Admin")
    return bearer(await login(client, email, password))


async def client_backends(pg: PgCluster, database: str) -> int:
    return int(await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
        database))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_a_paused_postgres_answers_503_within_the_bound_and_the_pool_recovers(fast_path: str) -> None:
    require_pg_cluster()
    with PgCluster(f"paused-{fast_path}") as pg:
        url = await migrated(await pg.create_database("atrium"))
        settings = make_settings(
            database_url=url, auto_migrate=False, fast_path=fast_path,
            database_pool_size=POOL_SIZE, database_max_overflow=0, database_pool_timeout=POOL_TIMEOUT,
            database_connect_timeout=CONNECT_TIMEOUT, database_statement_timeout=STATEMENT_TIMEOUT,
            health_timeout=1.0, outbox_poll_interval=0.2, **CHEAP_HASHING, **GENEROUS_RATE_LIMITS,
        )
        app = create_app(settings)
        async with serve(app) as client:
            engine = app.state.container.engine()
            assert fast_path_enabled(engine) is (fast_path == "on")
            admin = await create_admin(app, client)
            # Items nobody has read yet: a GET of one is a database read (DirectRead), not a cache hit.
            unread: list[str] = []
            for n in range(PAUSED_ROUNDS + 3):  # warm-up, paused rounds, two rounds after
                created = await client.post("/api/v1/items", headers=admin,
                                            json={"name": f"Thing {n}", "price": 100 + n, "currency": "EUR"})
                assert created.status_code == 201, created.text
                unread.append(created.json()["id"])

            def requests() -> list[tuple[str, Request]]:
                item = unread.pop()
                return [
                    ("sign-up", lambda: client.post("/api/v1/users", json=signup_body())),
                    ("list items", lambda: client.get("/api/v1/items?limit=5")),
                    ("read item", lambda: client.get(f"/api/v1/items/{item}")),
                    ("create item", lambda: client.post(
                        "/api/v1/items", headers=admin, json={"name": "New", "price": 1, "currency": "EUR"})),
                ]

            warm = await asyncio.gather(*(timed(kind, request) for kind, request in requests()))
            assert all(o.status < 300 for o in warm), [(o.kind, o.response.text) for o in warm]
            await asyncio.sleep(1.2)  # pooled connections idle past ping_after: the fast path pings them

            with paused(pg) as processes:
                paused_at = time.monotonic()
                outcomes: list[Outcome] = []
                for _ in range(PAUSED_ROUNDS):  # more requests than connections: some wait for one
                    batch = [timed(kind, request) for kind, request in requests() for _ in range(2)]
                    outcomes += await asyncio.gather(*batch)
                ready_started = time.monotonic()
                ready = await client.get("/health/ready")
                ready_took = time.monotonic() - ready_started
                paused_for = time.monotonic() - paused_at
            resumed = time.monotonic()

            for outcome in outcomes:
                assert_envelope(outcome.response, 503, "service_unavailable")
                assert outcome.response.headers["retry-after"] == "1"
            slowest = max(o.took for o in outcomes)
            assert slowest <= BOUND, [(o.kind, round(o.took, 2)) for o in outcomes]
            error = assert_envelope(ready, 503, "not_ready")
            assert error["details"]["checks"]["database"]["status"] == "down"

            # Back: the very next requests succeed, on the same app and the same pool.
            async def answers() -> bool:
                return (await client.get("/api/v1/items?limit=5")).status_code == 200

            await eventually(answers, within=10)
            first_ok = time.monotonic() - resumed
            after = [await timed(kind, request) for kind, request in requests()]
            after += await asyncio.gather(*(timed(kind, request) for kind, request in requests()))
            assert all(o.status < 300 for o in after), [(o.kind, o.status, o.response.text) for o in after]
            assert app.state.container.engine() is engine

            # Nothing leaked or stuck: no connection left checked out, none beyond the pool's size on
            # the server (those the client gave up on are gone there too).
            await eventually(lambda: engine.sync_engine.pool.checkedout() == 0, within=5)

            async def within_pool() -> bool:
                return await client_backends(pg, "atrium") <= POOL_SIZE

            await eventually(within_pool, within=10)
            server_side = await client_backends(pg, "atrium")

            by_kind: dict[str, list[float]] = {}
            for o in outcomes:
                by_kind.setdefault(o.kind, []).append(o.took)
            print(
                f"\n[paused postgres, fast path {fast_path}] {len(processes)} server processes stopped "
                f"{paused_for:.2f}s; {len(outcomes)} requests all 503, slowest {slowest:.2f}s "
                f"(bound {BOUND:.1f}s = pool {POOL_TIMEOUT:g} + max(connect {CONNECT_TIMEOUT:g}, "
                f"statement {STATEMENT_TIMEOUT:g} + grace {STATEMENT_GRACE:g}) + slack {SLACK:g}); "
                + ", ".join(f"{k} {min(v):.2f}-{max(v):.2f}s" for k, v in by_kind.items())
                + f"; /health/ready 503 in {ready_took:.2f}s; first 200 {first_ok:.2f}s after SIGCONT, "
                f"{len(after)} requests after it all 2xx; pool checked out 0, server backends {server_side} "
                f"(pool {POOL_SIZE})"
            )


@pytest.mark.slow
async def test_sqlite_a_write_waits_for_a_lock_no_longer_than_the_statement_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    settings = make_settings(database_url=sqlite_dsn(path), database_statement_timeout=STATEMENT_TIMEOUT,
                             **CHEAP_HASHING, **GENEROUS_RATE_LIMITS)
    app = create_app(settings)
    async with serve(app) as client:
        assert (await client.post("/api/v1/users", json=signup_body())).status_code == 201
        # The app's own background work on this event loop (the in-process worker, the outbox relay)
        # may hold the write lock for a moment after the sign-up: the holder waits for it in a thread,
        # so that work can finish (taken on the loop itself, the wait once deadlocked for 5 s on CI).
        holder = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        try:
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")  # another process's write lock
            started = time.monotonic()
            blocked = await client.post("/api/v1/users", json=signup_body())
            took = time.monotonic() - started
        finally:
            if holder.in_transaction:
                holder.execute("ROLLBACK")
            holder.close()

        assert_envelope(blocked, 503, "service_unavailable")
        assert STATEMENT_TIMEOUT * 0.9 <= took <= STATEMENT_TIMEOUT + SLACK, f"{took:.2f}s"
        assert (await client.post("/api/v1/users", json=signup_body())).status_code == 201
        print(f"\n[sqlite locked] a sign-up waited {took:.2f}s for the write lock, then 503 "
              f"(statement timeout {STATEMENT_TIMEOUT:g}s)")


@pytest.mark.postgres
@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_slow_statement_is_cancelled_by_the_server_and_its_connection_kept(
    pg_database_factory: Callable[[], Any], fast_path: bool,
) -> None:
    engine = create_engine(await pg_database_factory(), pool_size=1, max_overflow=0, statement_timeout=0.5,
                           connect_timeout=2.0, fast_path=fast_path)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("SHOW statement_timeout"))).scalar() == "500ms"
            pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar()
            started = time.monotonic()
            with pytest.raises(DBAPIError) as raised:
                await connection.execute(text("SELECT pg_sleep(5)"))
            took = time.monotonic() - started
            await connection.rollback()
        assert getattr(raised.value.orig, "sqlstate", None) == "57014"  # query_canceled, by the server
        assert not raised.value.connection_invalidated
        assert database_unavailable(raised.value)  # answered 503 at the edge
        assert took < 0.5 + STATEMENT_GRACE, f"{took:.2f}s"
        async with engine.connect() as connection:  # the same connection, still good
            assert (await connection.execute(text("SELECT pg_backend_pid()"))).scalar() == pid
    finally:
        await engine.dispose()
