"""The items repository and public face behave the same on SQLite and on PostgreSQL.

Every test runs twice (the ``session`` fixture is parametrized over both databases) inside a
transaction that is rolled back afterwards. Names carry a per-test prefix and every listing
filters by it, so rows other suites may leave in the shared databases can never match. The
concurrent-update test commits from several sessions, so it runs on a PostgreSQL database of its
own, dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.cache.read_through import ReadThroughCache
from core.cache.stores import NullCache
from core.db.base import new_id
from core.db.engine import create_engine
from core.db.session import UnitOfWork, commit, session_factory
from core.edge.pagination import CursorCodec
from core.messaging.outbox import Outbox, OutboxMessage
from modules.items.domain import name_key
from modules.items.models import ItemRow
from modules.items.public import ItemPrice
from modules.items.repository import ItemRepository
from modules.items.schemas import ItemUpdate
from modules.items.service import ItemService, ItemsFacadeImpl


@pytest.fixture
def repo() -> ItemRepository:
    return ItemRepository()


def make_service(sessions: Any = None) -> ItemService:
    cache = ReadThroughCache(NullCache(), CollectorRegistry(), name="items", ttl=60)
    return ItemService(ItemRepository(), Outbox(), cache, CursorCodec("contract-secret"), sessions)


def tag() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def add(session: AsyncSession, name: str, price: int = 100, currency: str = "EUR") -> ItemRow:
    row = ItemRow(id=new_id(), name=name, name_key=name_key(name), description="", price=price,
                  currency=currency)
    session.add(row)
    await session.flush()
    return row


async def page(session: AsyncSession, repo: ItemRepository, **kwargs: Any) -> list[ItemRow]:
    kwargs.setdefault("after", None)
    kwargs.setdefault("limit", 100)
    return list((await session.execute(repo.page(**kwargs))).scalars())


@contextmanager
def statements(session: AsyncSession) -> Iterator[list[str]]:
    """The SQL statements sent on the session's connection inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    target = session.bind.sync_connection  # type: ignore[union-attr]
    event.listen(target, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(target, "before_cursor_execute", record)


class TestPage:
    async def test_keyset_order_is_by_id_whatever_the_insert_order(
        self, session: AsyncSession, repo: ItemRepository
    ) -> None:
        t = tag()
        ids = [uuid.UUID(int=(0x01A2 << 112) + n * 7919 + 1) for n in (5, 1, 4, 2, 3)]
        for n, item_id in enumerate(ids):
            session.add(ItemRow(id=item_id, name=f"{t} {n}", name_key=f"{t} {n}", description="",
                                price=n, currency="EUR"))
        await session.flush()
        assert [r.id for r in await page(session, repo, name_prefix=t)] == sorted(ids)

    async def test_after_and_limit_plus_one(self, session: AsyncSession, repo: ItemRepository) -> None:
        t = tag()
        rows = [await add(session, f"{t} {i}") for i in range(7)]
        ids = sorted(r.id for r in rows)
        first = await page(session, repo, name_prefix=t, limit=3)
        assert [r.id for r in first] == ids[:4]  # limit + 1 rows: the extra one says "more"
        second = await page(session, repo, name_prefix=t, limit=3, after=ids[2])
        assert [r.id for r in second] == ids[3:7]
        last = await page(session, repo, name_prefix=t, limit=3, after=ids[5])
        assert [r.id for r in last] == ids[6:]
        assert await page(session, repo, name_prefix=t, limit=3, after=ids[6]) == []

    async def test_after_an_id_that_no_longer_exists(
        self, session: AsyncSession, repo: ItemRepository
    ) -> None:
        t = tag()
        rows = sorted([await add(session, f"{t} {i}") for i in range(3)], key=lambda r: r.id)
        gone = rows[1].id
        await session.delete(rows[1])
        await session.flush()
        assert [r.id for r in await page(session, repo, name_prefix=t, after=gone)] == [rows[2].id]

    async def test_price_range_is_inclusive(self, session: AsyncSession, repo: ItemRepository) -> None:
        t = tag()
        by_price = {p: (await add(session, f"{t} {p}", price=p)).id for p in (0, 99, 100, 200, 201)}

        async def prices(**kwargs: Any) -> set[int]:
            found = {r.id for r in await page(session, repo, name_prefix=t, **kwargs)}
            return {p for p, i in by_price.items() if i in found}

        assert await prices(min_price=100) == {100, 200, 201}
        assert await prices(max_price=100) == {0, 99, 100}
        assert await prices(min_price=100, max_price=200) == {100, 200}
        assert await prices(min_price=0, max_price=0) == {0}
        assert await prices(min_price=150, max_price=160) == set()

    async def test_currency(self, session: AsyncSession, repo: ItemRepository) -> None:
        t = tag()
        eur = (await add(session, f"{t} a", currency="EUR")).id
        usd = (await add(session, f"{t} b", currency="USD")).id
        assert [r.id for r in await page(session, repo, name_prefix=t, currency="EUR")] == [eur]
        assert [r.id for r in await page(session, repo, name_prefix=t, currency="USD")] == [usd]
        assert await page(session, repo, name_prefix=t, currency="GBP") == []

    async def test_filters_combine(self, session: AsyncSession, repo: ItemRepository) -> None:
        t = tag()
        wanted = (await add(session, f"{t} x", price=500, currency="EUR")).id
        await add(session, f"{t} y", price=500, currency="USD")
        await add(session, f"{t} z", price=5, currency="EUR")
        await add(session, f"other{t}", price=500, currency="EUR")
        found = await page(session, repo, name_prefix=t, min_price=100, max_price=1000, currency="EUR")
        assert [r.id for r in found] == [wanted]

    async def test_prefix_matches_the_start_only(self, session: AsyncSession, repo: ItemRepository) -> None:
        t = tag()
        start = (await add(session, f"{t} lamp")).id
        await add(session, f"x {t} lamp")
        assert [r.id for r in await page(session, repo, name_prefix=f"{t} la")] == [start]
        assert await page(session, repo, name_prefix=f"{t} lamps") == []

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("50%_", {"50%_off"}),
            ("50%", {"50%_off", "50%xoff"}),
            ("5", {"50%_off", "50%xoff", "500 off", "5_0 off"}),
            ("50", {"50%_off", "50%xoff", "500 off"}),
            ("5_", {"5_0 off"}),
            ("a\\", {"a\\b"}),
            ("a\\b", {"a\\b"}),
            ("%", set()),
            ("_", set()),
        ],
    )
    async def test_like_wildcards_in_the_prefix_are_literal(
        self, session: AsyncSession, repo: ItemRepository, query: str, expected: set[str]
    ) -> None:
        t = tag()
        for name in ("50%_off", "50%xoff", "500 off", "5_0 off", "a\\b", "ab"):
            await add(session, f"{t}{name}")
        found = {r.name.removeprefix(t) for r in await page(session, repo, name_prefix=f"{t}{query}")}
        assert found == expected

    async def test_no_filters_is_the_whole_table_in_id_order(
        self, session: AsyncSession, repo: ItemRepository
    ) -> None:
        t = tag()
        mine = {(await add(session, f"{t} {i}")).id for i in range(3)}
        everything = [r.id for r in await page(session, repo, limit=10_000)]
        assert everything == sorted(everything)
        assert mine <= set(everything)


class TestPrices:
    async def test_only_the_requested_ids_in_one_query(
        self, session: AsyncSession, repo: ItemRepository
    ) -> None:
        t = tag()
        a = await add(session, f"{t} a", price=100, currency="EUR")
        b = await add(session, f"{t} b", price=250, currency="JPY")
        await add(session, f"{t} c", price=999)
        with statements(session) as sent:
            rows = (await session.execute(repo.prices([a.id, b.id, uuid.uuid4()]))).all()
        assert len(sent) == 1
        assert sorted((r.id, r.name, r.price, r.currency) for r in rows) == sorted(
            [(a.id, f"{t} a", 100, "EUR"), (b.id, f"{t} b", 250, "JPY")]
        )

    async def test_the_facade_returns_item_prices_keyed_by_id(self, session: AsyncSession) -> None:
        t = tag()
        a = await add(session, f"{t} a", price=100, currency="EUR")
        b = await add(session, f"{t} b", price=0, currency="USD")
        facade = ItemsFacadeImpl(make_service())
        with statements(session) as sent:
            prices = await facade.prices(session, {a.id, b.id, uuid.uuid4()})
        assert len(sent) == 1
        assert prices == {
            a.id: ItemPrice(a.id, f"{t} a", 100, "EUR"),
            b.id: ItemPrice(b.id, f"{t} b", 0, "USD"),
        }
        assert all(isinstance(v, ItemPrice) for v in prices.values())

    async def test_the_facade_with_no_ids_asks_nothing(self, session: AsyncSession) -> None:
        facade = ItemsFacadeImpl(make_service())
        with statements(session) as sent:
            assert await facade.prices(session, []) == {}
            assert await facade.prices(session, set()) == {}
        assert sent == []

    async def test_the_facade_accepts_many_ids(self, session: AsyncSession) -> None:
        t = tag()
        rows = [await add(session, f"{t} {i}", price=i) for i in range(150)]
        with statements(session) as sent:
            prices = await ItemsFacadeImpl(make_service()).prices(session, [r.id for r in rows])
        assert len(sent) == 1
        assert {k: v.price for k, v in prices.items()} == {r.id: r.price for r in rows}


class TestConcurrentUpdate:
    """Two admins change one price at once (PostgreSQL: real concurrent transactions).

    Regression: ``update`` once read the row without a lock, so the later of two concurrent price
    changes reported the price before the first one as ``old_price`` and wrote the same version.
    The transactions commit for real, so the test has a database of its own (isolation by database).
    """

    @pytest.fixture
    async def sessions(self, private_postgres_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
        engine = create_engine(private_postgres_url)
        yield session_factory(engine)
        await engine.dispose()

    async def test_each_event_reports_the_price_it_replaced(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        service = make_service(sessions)
        async with UnitOfWork(sessions) as setup:
            item = await add(setup, f"{tag()} contested", price=100)
        slow = sessions()
        try:
            # Request B's update() has read the row (it holds it, as update() does) ...
            read_by_b = await service._items.get(slow, item.id)
            assert read_by_b is not None
            assert read_by_b.price == 100
            async with UnitOfWork(sessions) as fast:  # ... when request A changes the price ...
                await service.update(fast, item.id, ItemUpdate(price=200))
            await service.update(slow, item.id, ItemUpdate(price=300))  # ... and then B writes.
            await commit(slow)
        finally:
            await slow.close()
        async with sessions() as check:
            final = await check.get(ItemRow, item.id)
            rows = (
                await check.execute(
                    select(OutboxMessage.id, OutboxMessage.payload)
                    .where(OutboxMessage.name == "items.ItemPriceChanged")
                    .order_by(OutboxMessage.id)
                )
            ).all()
            events = [payload for _, payload in rows if payload["item_id"] == str(item.id)]
        assert final is not None
        assert final.price == 300
        assert [(e["old_price"], e["new_price"]) for e in events] == [(100, 200), (200, 300)]
        assert final.version == 3
