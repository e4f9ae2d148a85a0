"""A direct transaction (``core.fastpath.transactions``) is one transaction the session owns, whatever
runs in it.

On PostgreSQL a ``DirectWrite`` on an idle ``AtriumSession`` begins a transaction on a pooled
connection of its own, outside the ORM's bookkeeping. These tests hold it to what the session
promises for any transaction: ``commit``/``rollback``/``close``/``reset`` end it, ORM work joins
it (one transaction), driver errors arrive as SQLAlchemy's, a dead connection never goes back into
use, and the connection always returns to the pool. On SQLite, and for a session already in a
transaction, ``DirectWrite`` runs on the session's own connection as before.

Rows are committed for real (each test has its own engine), so each test has a database of its own
(a fresh PostgreSQL database, a fresh SQLite file), dropped afterwards; names carry a per-test
prefix. Visibility is checked from a plain asyncpg
connection (``Peer``), which only ever sees committed rows. Calls that could hang on a broken
connection run under ``asyncio.wait_for`` so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Uuid,
    bindparam,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy import insert as insert_into
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from core.db.base import new_id, utcnow
from core.db.engine import create_engine
from core.db.session import UnitOfWork, commit, on_commit, session_factory
from core.db.statements import DirectRead, DirectWrite
from core.fastpath.transactions import AtriumSession
from modules.items.domain import Item, name_key
from modules.items.models import ItemRow
from modules.items.repository import _INSERT, ItemRepository

GUARD = 10.0  # seconds; far beyond any operation here, only there to turn a hang into a failure
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------


class Rows:
    """The items of one test: a unique name prefix, and every id handed out."""

    def __init__(self) -> None:
        self.tag = f"direct{uuid.uuid4().hex[:10]}"
        self.ids: list[uuid.UUID] = []

    def item(self, label: str, item_id: uuid.UUID | None = None) -> Item:
        now = utcnow()
        item = Item(id=item_id or new_id(), name=f"{self.tag} {label}", description="", price=100,
                    currency="EUR", version=1, created_at=now, updated_at=now)
        self.ids.append(item.id)
        return item

    def orm_row(self, label: str) -> ItemRow:
        name = f"{self.tag} {label}"
        row = ItemRow(id=new_id(), name=name, name_key=name_key(name), description="", price=100,
                      currency="EUR")
        self.ids.append(row.id)
        return row


class Peer:
    """A plain asyncpg connection outside every engine: it sees committed rows only."""

    def __init__(self, connection: asyncpg.Connection, dsn: str) -> None:
        self.connection = connection
        self.dsn = dsn

    async def committed(self, rows: Rows) -> set[uuid.UUID]:
        """The ids of ``rows`` that are committed."""
        records = await self.connection.fetch("SELECT id FROM items WHERE id = ANY($1::uuid[])", rows.ids)
        return {r["id"] for r in records}

    async def writing_backend(self) -> int:
        """The pid of the one backend of this database idle inside a transaction that wrote."""
        records = await self.connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'idle in transaction' AND backend_xid IS NOT NULL"
        )
        assert len(records) == 1, records
        return int(records[0]["pid"])

    async def waiting_for_a_lock(self) -> int:
        """How many backends of this database wait for a lock."""
        return int(await self.connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ))

    async def until_a_backend_waits_for_a_lock(self) -> None:
        async with asyncio.timeout(GUARD):
            # The server has no event for "a backend now waits for a lock": poll the condition.
            while not await self.waiting_for_a_lock():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def terminate(self, pid: int) -> None:
        """Kill backend ``pid`` and wait until it has exited."""
        assert await self.connection.fetchval("SELECT pg_terminate_backend($1, $2)", pid, int(GUARD * 1000))


async def insert(session: AsyncSession, item: Item) -> None:
    await ItemRepository().insert(session, item, name_key(item.name))


def checked_out(engine: AsyncEngine) -> int:
    return engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]


async def guarded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, GUARD)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def peer(private_postgres_url: str) -> AsyncIterator[Peer]:
    dsn = asyncpg_dsn(private_postgres_url)
    connection = await asyncpg.connect(dsn)
    try:
        yield Peer(connection, dsn)
        # A connection a failing test leaked (checked out, idle in its transaction) would hold
        # its locks and confuse the next test's ``writing_backend``: end it here.
        await connection.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        )
    finally:
        await connection.close()


@pytest.fixture
def rows() -> Rows:
    return Rows()


@pytest.fixture
async def make_engine(private_postgres_url: str) -> AsyncIterator[Callable[..., AsyncEngine]]:
    """Fresh fast-path PostgreSQL engines (``pool_size=2, max_overflow=0`` unless told), disposed after."""
    made: list[AsyncEngine] = []

    def make(**options: Any) -> AsyncEngine:
        options.setdefault("pool_size", 2)
        options.setdefault("max_overflow", 0)
        options.setdefault("fast_path", True)  # the fast path's session and statements are under test
        engine = create_engine(private_postgres_url, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.dispose()


@pytest.fixture
def engine(make_engine: Callable[..., AsyncEngine]) -> AsyncEngine:
    return make_engine()


# --- PostgreSQL: ending a direct transaction ----------------------------------------------------


@pytest.mark.postgres
class TestEnding:
    async def test_a_write_on_an_idle_session_opens_a_direct_transaction_nobody_else_sees(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        assert isinstance(session, AtriumSession)
        assert not session.in_direct_transaction()
        await insert(session, rows.item("a"))
        try:
            assert session.in_direct_transaction()
            assert not session.in_transaction()  # the ORM session itself has not begun anything
            assert checked_out(engine) == 1
            assert await peer.committed(rows) == set()  # really inside an open transaction
            assert await peer.writing_backend() > 0
        finally:
            await session.rollback()

    async def test_commit_makes_the_row_visible_and_returns_the_connection(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        assert session.in_direct_transaction()

        await session.commit()

        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == {item.id}
        await session.close()
        assert checked_out(engine) == 0

    # invalidate(): the way out for a session in doubt, with no close() after it.
    @pytest.mark.parametrize("end", ["rollback", "reset", "invalidate"])
    async def test_ending_without_a_commit_discards_the_row_and_returns_the_connection(
        self, engine: AsyncEngine, peer: Peer, rows: Rows, end: str
    ) -> None:
        session = session_factory(engine)()
        await insert(session, rows.item("a"))

        await guarded(getattr(session, end)())

        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == set()

    async def test_close_without_commit_discards_the_row(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        async with session_factory(engine)() as session:
            await insert(session, rows.item("a"))
            assert session.in_direct_transaction()
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == set()

    async def test_two_writes_are_one_transaction_committed_together(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        first, second = rows.item("1"), rows.item("2")
        await insert(session, first)
        await insert(session, second)
        assert checked_out(engine) == 1  # the second write used the same connection
        assert await peer.committed(rows) == set()

        await session.commit()

        assert await peer.committed(rows) == {first.id, second.id}
        assert checked_out(engine) == 0

    async def test_two_writes_are_one_transaction_rolled_back_together(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        await insert(session, rows.item("1"))
        await _INSERT.run(session, **_values(rows.item("2")))  # the statement itself, no repository

        await session.rollback()

        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0

    async def test_the_session_begins_a_new_direct_transaction_after_each_end(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        discarded, kept = rows.item("discarded"), rows.item("kept")
        await insert(session, discarded)
        await session.rollback()

        await insert(session, kept)
        assert session.in_direct_transaction()
        await session.commit()

        assert await peer.committed(rows) == {kept.id}
        assert checked_out(engine) == 0


def _values(item: Item) -> dict[str, Any]:
    return {"id": item.id, "name": item.name, "name_key": name_key(item.name),
            "description": item.description, "price": item.price, "currency": item.currency,
            "version": item.version, "created_at": item.created_at, "updated_at": item.updated_at}


# --- PostgreSQL: ORM work adopts the direct transaction -----------------------------------------


@pytest.mark.postgres
class TestAdoption:
    async def test_a_query_after_a_direct_write_sees_the_uncommitted_row(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)

        found = await session.scalar(select(ItemRow.name).where(ItemRow.id == item.id))

        assert found == item.name
        assert session.in_transaction()
        assert checked_out(engine) == 1  # the query ran on the direct transaction's connection
        assert await peer.committed(rows) == set()
        await session.commit()
        assert await peer.committed(rows) == {item.id}
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0

    async def test_the_adopted_connection_is_the_direct_transactions_backend(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        await insert(session, rows.item("a"))
        backend = await peer.writing_backend()

        connection = await session.connection()
        pid = (await connection.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()

        assert pid == backend
        await session.rollback()
        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0

    async def test_an_orm_insert_after_a_direct_write_commits_with_it(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        direct, orm = rows.item("direct"), rows.orm_row("orm")
        await insert(session, direct)
        session.add(orm)
        await session.flush()
        assert checked_out(engine) == 1
        assert await peer.committed(rows) == set()

        await session.commit()

        assert await peer.committed(rows) == {direct.id, orm.id}
        assert checked_out(engine) == 0

    @pytest.mark.parametrize("end", ["rollback", "close"])
    async def test_an_orm_insert_after_a_direct_write_is_discarded_with_it(
        self, engine: AsyncEngine, peer: Peer, rows: Rows, end: str
    ) -> None:
        session = session_factory(engine)()
        await insert(session, rows.item("direct"))
        session.add(rows.orm_row("orm"))
        await session.flush()

        await getattr(session, end)()

        assert await peer.committed(rows) == set()
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0

    async def test_a_pending_add_is_flushed_into_the_direct_transaction_at_commit(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        direct, pending = rows.item("direct"), rows.orm_row("pending")
        await insert(session, direct)
        session.add(pending)  # never flushed before the commit

        await session.commit()

        assert await peer.committed(rows) == {direct.id, pending.id}
        assert checked_out(engine) == 0

    async def test_a_direct_write_after_adoption_joins_the_session_transaction(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        first, second = rows.item("1"), rows.item("2")
        await insert(session, first)
        await session.execute(select(1))  # adopted
        await insert(session, second)
        assert checked_out(engine) == 1
        count = await session.scalar(select(func.count()).where(ItemRow.id.in_([first.id, second.id])))
        assert count == 2

        await session.rollback()

        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0

    async def test_asking_for_the_bind_loses_nothing_on_commit(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        assert session.get_bind().dialect.name == "postgresql"  # public API, e.g. to pick a dialect

        await guarded(session.commit())

        assert await peer.committed(rows) == {item.id}
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0

    async def test_asking_for_the_bind_then_rolling_back_returns_the_connection(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        await insert(session, rows.item("a"))
        session.get_bind()

        await guarded(session.rollback())

        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == set()

    async def test_a_begin_block_after_a_direct_write_does_not_leave_it_open(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)

        try:
            async with session.begin():
                pass
        except InvalidRequestError:  # refusing, as a session already in a transaction does, is fine
            await session.rollback()
            assert await peer.committed(rows) == set()
        else:  # the block committed the session's transaction: the direct write is in it
            assert await peer.committed(rows) == {item.id}
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        await session.close()


# --- PostgreSQL: a session already in a transaction keeps using it ------------------------------


@pytest.mark.postgres
class TestSessionPath:
    async def test_orm_work_first_means_the_write_runs_in_the_session_transaction(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        await session.execute(select(1))
        item = rows.item("a")

        await insert(session, item)

        assert not session.in_direct_transaction()
        assert checked_out(engine) == 1
        assert await session.scalar(select(ItemRow.id).where(ItemRow.id == item.id)) == item.id
        await session.rollback()
        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0

    async def test_orm_work_first_then_commit_persists_the_write(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        await session.execute(select(1))
        item = rows.item("a")
        await insert(session, item)

        await session.commit()

        assert await peer.committed(rows) == {item.id}
        assert checked_out(engine) == 0

    async def test_a_session_bound_to_a_connection_writes_on_that_connection(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        async with engine.connect() as connection:
            session = AtriumSession(bind=connection)
            await insert(session, rows.item("a"))
            assert not session.in_direct_transaction()
            assert connection.in_transaction()
            assert checked_out(engine) == 1  # no connection of its own
            await session.rollback()
            await session.close()
        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0


# --- PostgreSQL: errors -------------------------------------------------------------------------


@pytest.mark.postgres
class TestObserved:
    """Statements something listens to (tracing, statement logs) never take the direct paths."""

    @staticmethod
    def listen(engine: AsyncEngine) -> list[str]:
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        return seen

    async def test_a_write_on_a_listened_engine_runs_in_the_session_and_is_seen(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        seen = self.listen(engine)
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        assert not session.in_direct_transaction()
        assert session.in_transaction()
        assert any(s.startswith("INSERT INTO items") for s in seen), seen
        await commit(session, close=True)
        assert await peer.committed(rows) == {item.id}
        assert checked_out(engine) == 0

    async def test_a_direct_read_on_a_listened_engine_is_seen(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        await commit(session, close=True)
        unseen = await ItemRepository().read(engine, item.id)  # nobody listening: the driver's record
        seen = self.listen(engine)
        row = await ItemRepository().read(engine, item.id)
        assert any("FROM items" in s for s in seen), seen
        assert unseen is not None
        assert row is not None
        assert dict(row) == dict(unseen)
        assert checked_out(engine) == 0


@pytest.mark.postgres
class TestErrors:
    async def test_a_duplicate_primary_key_is_an_integrity_error(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        async with session_factory(engine)() as setup:
            original = rows.item("original")
            await insert(setup, original)
            await setup.commit()
        session = session_factory(engine)()

        with pytest.raises(IntegrityError) as raised:
            await insert(session, rows.item("copy", item_id=original.id))

        assert session.in_direct_transaction()  # the error came from the direct path
        assert getattr(raised.value.orig, "sqlstate", None) == "23505"
        assert not raised.value.connection_invalidated
        await guarded(session.rollback())
        assert checked_out(engine) == 0
        retry = rows.item("retry")
        await insert(session, retry)
        await session.commit()
        assert await peer.committed(rows) == {original.id, retry.id}
        assert checked_out(engine) == 0

    async def test_the_direct_error_is_the_one_the_session_path_raises(
        self, engine: AsyncEngine, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        first = rows.item("first")
        await insert(session, first)
        with pytest.raises(IntegrityError) as direct:
            await insert(session, rows.item("same id", item_id=first.id))
        assert session.in_direct_transaction()
        await session.rollback()

        await session.execute(select(1))  # the session path
        await insert(session, first)
        with pytest.raises(IntegrityError) as orm:
            await insert(session, rows.item("same id", item_id=first.id))
        assert not session.in_direct_transaction()
        await session.rollback()

        assert type(direct.value.orig) is type(orm.value.orig)
        assert direct.value.orig.sqlstate == orm.value.orig.sqlstate  # type: ignore[union-attr]
        assert checked_out(engine) == 0

    async def test_a_dead_connection_is_invalidated_and_replaced(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=1, pool_pre_ping=False)  # only the invalidation keeps it out
        session = session_factory(engine)()
        await insert(session, rows.item("lost"))
        await peer.terminate(await peer.writing_backend())

        with pytest.raises(DBAPIError) as raised:
            await guarded(insert(session, rows.item("after")))

        assert raised.value.connection_invalidated
        await guarded(session.rollback())
        await guarded(session.close())
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        survivor = rows.item("survivor")
        async with session_factory(engine)() as fresh:  # the pool's only slot, reconnected
            await guarded(insert(fresh, survivor))
            assert fresh.in_direct_transaction()
            await guarded(fresh.commit())
        assert await peer.committed(rows) == {survivor.id}
        assert checked_out(engine) == 0

    async def test_a_dead_adopted_connection_is_invalidated_and_replaced(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=1, pool_pre_ping=False)  # only the invalidation keeps it out
        session = session_factory(engine)()
        await insert(session, rows.item("lost"))
        pid = await session.scalar(text("SELECT pg_backend_pid()"))  # adopts the transaction
        assert isinstance(pid, int)
        await peer.terminate(pid)

        with pytest.raises(DBAPIError) as raised:
            await guarded(insert(session, rows.item("after")))

        assert raised.value.connection_invalidated
        await guarded(session.rollback())
        await guarded(session.close())
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        survivor = rows.item("survivor")
        async with session_factory(engine)() as fresh:
            await guarded(insert(fresh, survivor))
            await guarded(fresh.commit())
        assert await peer.committed(rows) == {survivor.id}
        assert checked_out(engine) == 0

    async def test_a_write_cancelled_while_waiting_for_a_lock_leaves_nothing_behind(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=1)
        contested = rows.item("contested")
        holder = await asyncpg.connect(peer.dsn)
        try:
            async with holder.transaction():  # holds the same primary key, uncommitted
                await holder.execute(
                    "INSERT INTO items (id, name, name_key, description, price, currency, version,"
                    " created_at, updated_at) VALUES ($1, $2, $2, '', 1, 'EUR', 1, now(), now())",
                    contested.id, f"{rows.tag} holder",
                )
                session = session_factory(engine)()
                blocked = asyncio.create_task(insert(session, contested))
                await peer.until_a_backend_waits_for_a_lock()
                blocked.cancel()  # a request timeout, a client gone
                with pytest.raises(asyncio.CancelledError):
                    await blocked
                await guarded(session.close())
                assert not session.in_direct_transaction()
                assert checked_out(engine) == 0
                assert await peer.waiting_for_a_lock() == 0  # the server side gave up too
        finally:
            await holder.close()
        # The holder committed its row; the cancelled session wrote nothing and holds nothing.
        survivor = rows.item("survivor")
        async with session_factory(engine)() as fresh:
            await guarded(insert(fresh, survivor))
            await guarded(fresh.commit())
        assert await peer.committed(rows) == {contested.id, survivor.id}
        assert checked_out(engine) == 0


# --- PostgreSQL: the request edge and the unit of work ------------------------------------------


class Deferred:
    """A scratch child table whose foreign key is only checked at COMMIT: a commit the server
    refuses, without breaking the connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.engine = engine
        self.metadata = MetaData()
        parent = Table(f"direct_parent_{suffix}", self.metadata, Column("id", Integer, primary_key=True))
        self.child = Table(
            f"direct_child_{suffix}", self.metadata,
            Column("id", Uuid, primary_key=True),
            Column("parent_id", Integer, ForeignKey(parent.c.id, deferrable=True, initially="DEFERRED")),
        )
        self.write = DirectWrite(insert_into(self.child))

    async def count(self, peer: Peer) -> int:
        return int(await peer.connection.fetchval(f'SELECT count(*) FROM "{self.child.name}"'))


@pytest.fixture
async def deferred(make_engine: Callable[..., AsyncEngine]) -> AsyncIterator[Deferred]:
    made = Deferred(make_engine(pool_size=1))
    async with made.engine.begin() as connection:
        await connection.run_sync(made.metadata.create_all)
    yield made
    async with made.engine.begin() as connection:
        await connection.run_sync(made.metadata.drop_all)


@pytest.mark.postgres
class TestRequestEdge:
    async def test_commit_and_close_commits_runs_each_hook_once_after_and_closes(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        ran: list[tuple[str, bool, int]] = []

        def sync_hook() -> None:
            ran.append(("sync", session.in_direct_transaction(), checked_out(engine)))

        async def async_hook() -> None:
            ran.append(("async", item.id in await peer.committed(rows), checked_out(engine)))

        on_commit(session, sync_hook)
        on_commit(session, async_hook)
        assert ran == []

        await commit(session, close=True)

        assert ran == [("sync", False, 0), ("async", True, 0)]  # after the commit and the close
        assert "after_commit" not in session.info
        assert not session.in_direct_transaction()
        assert not session.in_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == {item.id}

    async def test_commit_without_close_commits_and_runs_the_hook(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        session = session_factory(engine)()
        item = rows.item("a")
        await insert(session, item)
        ran: list[bool] = []
        on_commit(session, lambda: ran.append(session.in_direct_transaction()))

        await commit(session)

        assert ran == [False]
        assert await peer.committed(rows) == {item.id}
        assert checked_out(engine) == 0
        await session.close()

    async def test_a_failed_commit_runs_no_hook_and_still_closes(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=1, pool_pre_ping=False)  # only the invalidation keeps it out
        session = session_factory(engine)()
        await insert(session, rows.item("a"))
        ran: list[str] = []

        async def async_hook() -> None:
            ran.append("async")

        on_commit(session, lambda: ran.append("sync"))
        on_commit(session, async_hook)
        await peer.terminate(await peer.writing_backend())  # the commit cannot reach the server

        with pytest.raises(DBAPIError) as raised:
            await guarded(commit(session, close=True))

        assert raised.value.connection_invalidated
        assert ran == []
        assert not session.in_direct_transaction()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == set()
        survivor = rows.item("survivor")
        async with session_factory(engine)() as fresh:  # the pool's only slot, reconnected
            await guarded(insert(fresh, survivor))
            await guarded(commit(fresh, close=True))
        assert await peer.committed(rows) == {survivor.id}

    async def test_a_commit_the_server_refuses_runs_no_hook_and_keeps_the_connection(
        self, deferred: Deferred, peer: Peer
    ) -> None:
        session = session_factory(deferred.engine)()
        await deferred.write.run(session, id=new_id(), parent_id=404)  # no such parent: fails at COMMIT
        assert session.in_direct_transaction()
        ran: list[str] = []

        async def async_hook() -> None:
            ran.append("async")

        on_commit(session, lambda: ran.append("sync"))
        on_commit(session, async_hook)

        with pytest.raises(IntegrityError) as raised:
            await guarded(commit(session, close=True))

        assert getattr(raised.value.orig, "sqlstate", None) == "23503"
        assert not raised.value.connection_invalidated
        assert ran == []
        assert not session.in_direct_transaction()
        assert checked_out(deferred.engine) == 0
        assert await deferred.count(peer) == 0
        async with session_factory(deferred.engine)() as fresh:  # the pool's only connection, sound
            await guarded(deferred.write.run(fresh, id=new_id(), parent_id=None))
            assert fresh.in_direct_transaction()
            await guarded(fresh.commit())
        assert await deferred.count(peer) == 1
        assert checked_out(deferred.engine) == 0

    async def test_a_commit_cancelled_midway_never_puts_its_connection_back_in_use(
        self, deferred: Deferred, peer: Peer
    ) -> None:
        # A deferred trigger that sleeps holds the COMMIT on the server long enough to cancel it.
        function = f"{deferred.child.name}_slow"
        await peer.connection.execute(
            f'CREATE FUNCTION "{function}"() RETURNS trigger LANGUAGE plpgsql AS '
            "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
        )
        await peer.connection.execute(
            f'CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON "{deferred.child.name}" '
            f'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{function}"()'
        )
        sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event = 'PgSleep'")
        try:
            session = session_factory(deferred.engine)()
            await deferred.write.run(session, id=new_id(), parent_id=None)
            committing = asyncio.create_task(commit(session, close=True))
            async with asyncio.timeout(GUARD):
                # No event says "the server is running the COMMIT's trigger": poll for it.
                while not await peer.connection.fetchval(sleeping):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            committing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await committing
            assert not session.in_direct_transaction()
            assert checked_out(deferred.engine) == 0
            # The pool's only slot: had the interrupted connection gone back, this would meet it
            # mid-COMMIT; it was invalidated, so the pool connects afresh.
            async with session_factory(deferred.engine)() as fresh:
                await guarded(deferred.write.run(fresh, id=new_id(), parent_id=None))
                await guarded(fresh.commit())
        finally:
            async with asyncio.timeout(GUARD):
                while await peer.connection.fetchval(sleeping):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await peer.connection.execute(f'DROP TRIGGER slow ON "{deferred.child.name}"')
            await peer.connection.execute(f'DROP FUNCTION "{function}"()')


@pytest.mark.postgres
class TestUnitOfWork:
    async def test_a_direct_write_inside_is_committed(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        item = rows.item("a")
        async with UnitOfWork(session_factory(engine)) as session:
            await insert(session, item)
            assert session.in_direct_transaction()  # type: ignore[attr-defined]
        assert await peer.committed(rows) == {item.id}
        assert checked_out(engine) == 0

    async def test_an_exception_inside_rolls_the_direct_write_back(
        self, engine: AsyncEngine, peer: Peer, rows: Rows
    ) -> None:
        class Boom(Exception):
            pass

        direct: list[bool] = []

        async def job() -> None:
            async with UnitOfWork(session_factory(engine)) as session:
                await insert(session, rows.item("a"))
                direct.append(session.in_direct_transaction())  # type: ignore[attr-defined]
                raise Boom

        with pytest.raises(Boom):
            await job()
        assert direct == [True]
        assert await peer.committed(rows) == set()
        assert checked_out(engine) == 0


# --- PostgreSQL: many sessions, few connections -------------------------------------------------


@pytest.mark.postgres
class TestPool:
    async def test_concurrent_requests_share_a_small_pool(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=2)
        sessions = session_factory(engine)
        items = [rows.item(str(n)) for n in range(20)]
        direct: list[bool] = []

        async def request(item: Item) -> None:
            session = sessions()
            await insert(session, item)
            direct.append(session.in_direct_transaction())  # type: ignore[attr-defined]
            await commit(session, close=True)

        await guarded(asyncio.gather(*(request(item) for item in items)))

        assert direct == [True] * len(items)
        assert await peer.committed(rows) == {item.id for item in items}
        assert checked_out(engine) == 0

    async def test_an_exhausted_pool_times_out_instead_of_hanging(
        self, make_engine: Callable[..., AsyncEngine], peer: Peer, rows: Rows
    ) -> None:
        engine = make_engine(pool_size=1, pool_timeout=0.2)
        sessions = session_factory(engine)
        holder, waiter = sessions(), sessions()
        held = rows.item("held")
        await insert(holder, held)  # the only connection, in an open direct transaction

        with pytest.raises(PoolTimeout):
            await guarded(insert(waiter, rows.item("waiting")))

        assert not waiter.in_direct_transaction()  # type: ignore[attr-defined]
        await waiter.close()
        assert checked_out(engine) == 1
        await holder.commit()
        assert checked_out(engine) == 0
        assert await peer.committed(rows) == {held.id}


class TestDirectRead:
    async def test_a_read_cancelled_midway_never_puts_its_connection_back_in_use(
        self, make_engine: Callable[..., AsyncEngine]
    ) -> None:
        # A client gone mid-request cancels the read while asyncpg waits for the reply: that
        # connection, with its operation still open, must not serve the next read.
        engine = make_engine(pool_size=1)
        slow = DirectRead(select(func.pg_sleep(bindparam("seconds")).label("slept")))
        quick = DirectRead(select(literal_column("1").label("one")))
        reading = asyncio.create_task(slow.one(engine, seconds=5))
        await asyncio.sleep(0.3)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading

        row = await guarded(quick.one(engine))

        assert row is not None
        assert row["one"] == 1
        assert checked_out(engine) == 0

    async def test_a_read_returns_the_row_as_a_mapping_or_none(
        self, make_engine: Callable[..., AsyncEngine]
    ) -> None:
        engine = make_engine()
        read = DirectRead(select(literal_column("2").label("two")).where(bindparam("found")))

        assert (await read.one(engine, found=True))["two"] == 2  # type: ignore[index]
        assert await read.one(engine, found=False) is None


# --- SQLite: the session path -------------------------------------------------------------------


class TestSQLite:
    @pytest.fixture
    async def sqlite_engine(self, private_sqlite_url: str) -> AsyncIterator[AsyncEngine]:
        engine = create_engine(private_sqlite_url, pool_size=2, max_overflow=0, fast_path=True)
        yield engine
        await engine.dispose()

    @pytest.fixture
    def sqlite_rows(self) -> Rows:
        return Rows()

    @staticmethod
    async def committed(engine: AsyncEngine, rows: Rows) -> set[uuid.UUID]:
        async with engine.connect() as connection:
            found = await connection.scalars(select(ItemRow.id).where(ItemRow.id.in_(rows.ids)))
            return set(found)

    async def test_a_write_runs_in_the_session_transaction_and_commits(
        self, sqlite_engine: AsyncEngine, sqlite_rows: Rows
    ) -> None:
        session = session_factory(sqlite_engine)()
        item = sqlite_rows.item("a")

        await insert(session, item)

        assert isinstance(session, AtriumSession)
        assert not session.in_direct_transaction()
        assert session.in_transaction()
        await session.commit()
        await session.close()
        assert await self.committed(sqlite_engine, sqlite_rows) == {item.id}
        assert checked_out(sqlite_engine) == 0

    async def test_a_write_rolls_back_with_the_session(
        self, sqlite_engine: AsyncEngine, sqlite_rows: Rows
    ) -> None:
        session = session_factory(sqlite_engine)()
        await insert(session, sqlite_rows.item("a"))
        assert not session.in_direct_transaction()  # type: ignore[attr-defined]

        await session.rollback()
        await session.close()

        assert await self.committed(sqlite_engine, sqlite_rows) == set()
        assert checked_out(sqlite_engine) == 0

    async def test_the_request_edge_commits_and_runs_the_hook(
        self, sqlite_engine: AsyncEngine, sqlite_rows: Rows
    ) -> None:
        session = session_factory(sqlite_engine)()
        item = sqlite_rows.item("a")
        await insert(session, item)
        ran: list[int] = []
        on_commit(session, lambda: ran.append(checked_out(sqlite_engine)))

        await commit(session, close=True)

        assert ran == [0]
        assert await self.committed(sqlite_engine, sqlite_rows) == {item.id}
