"""Listing items is index-backed on PostgreSQL: the plans of the statements ``ItemRepository.page``
builds, on a table big enough (5,000 rows, analysed) for the planner to prefer an index when one
fits. The plans are printed (``-s``) and documented in ``docs/query-plans.md``, which must stay
current: the test generates the document and compares it with the file, costs, row estimates,
widths, timings and ids aside. To regenerate it, delete the file and run this module.
"""

from __future__ import annotations

import difflib
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select, insert, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.base import utcnow
from core.db.engine import create_engine
from modules.items.domain import name_key
from modules.items.models import ItemRow
from modules.items.repository import ItemRepository
from tests.support.db import migrated

pytestmark = pytest.mark.postgres

ROWS = 5_000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "query-plans.md"
REGENERATE = "delete docs/query-plans.md and run `pytest tests/contract/test_item_query_plans.py`"
WORDS = ["lamp", "chair", "table", "desk", "sofa", "shelf", "rug", "mirror", "clock", "vase",
         "stool", "bench", "bed", "cabinet", "drawer", "frame", "light", "plant", "pillow", "towel"]
EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the first item's id timestamp


def fixed_id(n: int, rng: random.Random) -> uuid.UUID:
    """A UUIDv7 like ``new_id()``'s, but the same on every run: item ``n`` was made ``n`` ms after
    ``EPOCH_MS``, so ids sort in insertion order, and the random bits come from ``rng``."""
    value = ((EPOCH_MS + n) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= rng.getrandbits(12) << 64
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rng.getrandbits(62)
    return uuid.UUID(int=value)


@pytest.fixture(scope="module")
async def engine(pg_database_factory: Callable[[], Awaitable[str]]) -> AsyncIterator[AsyncEngine]:
    """A migrated database of this module's own with ``ROWS`` analysed items, the same on every run."""
    engine = create_engine(await migrated(await pg_database_factory()))
    rng, ids = random.Random(7), random.Random(11)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for i in range(ROWS):
        name = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}"
        rows.append({
            "id": fixed_id(i, ids), "name": name, "name_key": name_key(name), "description": "",
            "price": rng.randrange(0, 1_000_000), "currency": rng.choice(["EUR", "USD", "GBP"]),
            "version": 1, "created_at": now, "updated_at": now,
        })
    async with engine.begin() as connection:
        await connection.execute(insert(ItemRow), rows)
    async with engine.connect() as connection:
        await connection.execute(text("ANALYZE items"))
        await connection.commit()
    yield engine
    await engine.dispose()


def sql(statement: Select[Any]) -> str:
    # The asyncpg dialect, as the app uses: the default psycopg one would double every ``%``.
    dialect = postgresql.asyncpg.dialect()
    compiled = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    return "\n".join(line.strip() for line in compiled.splitlines())


async def explain(engine: AsyncEngine, statement: Select[Any]) -> str:
    async with engine.connect() as connection:
        result = await connection.execute(text("EXPLAIN " + sql(statement)))
        return "\n".join(row[0] for row in result)


async def middle_id(engine: AsyncEngine) -> uuid.UUID:
    async with engine.connect() as connection:
        result = await connection.execute(text("SELECT id FROM items ORDER BY id OFFSET 2500 LIMIT 1"))
        return result.scalar_one()


CASES: dict[str, tuple[str, Callable[[uuid.UUID], Select[Any]], str | None]] = {
    "first page": (
        "GET /items?limit=20",
        lambda _: ItemRepository().page(after=None, limit=20),
        "pk_items",
    ),
    "page after a cursor": (
        "GET /items?limit=20&cursor=...",
        lambda after: ItemRepository().page(after=after, limit=20),
        "pk_items",
    ),
    "name prefix": (
        "GET /items?q=Lamp%20Ch&limit=20",
        lambda _: ItemRepository().page(after=None, limit=20, name_prefix="lamp ch"),
        "ix_items_name_key",
    ),
    "name prefix after a cursor": (
        "GET /items?q=Lamp%20Ch&limit=20&cursor=...",
        lambda after: ItemRepository().page(after=after, limit=20, name_prefix="lamp ch"),
        "ix_items_name_key",
    ),
    "price range": (
        "GET /items?min_price=1000&max_price=3000&limit=20",
        lambda _: ItemRepository().page(after=None, limit=20, min_price=1000, max_price=3000),
        "ix_items_price",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_listing_uses_an_index(engine: AsyncEngine, case: str) -> None:
    request, build, index = CASES[case]
    plan = await explain(engine, build(await middle_id(engine)))
    print(f"\n-- {case}: {request}\n{plan}")
    assert any(scan in plan for scan in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")), plan
    assert "Seq Scan" not in plan, plan
    if index is not None:
        assert index in plan, f"expected {index}:\n{plan}"


async def explain_prepared(engine: AsyncEngine, statement: Select[Any], executions: int = 6) -> str:
    """The plan PostgreSQL uses for ``statement`` sent the way the app sends it.

    The asyncpg driver prepares each statement once per connection (its statement cache) and then
    executes it with bound parameters; after five executions PostgreSQL may switch that prepared
    statement to a generic plan, made without looking at the parameter values. This replays that
    with ``PREPARE`` / ``EXECUTE`` over the exact SQL SQLAlchemy sends, then explains the next run.
    """
    compiled = statement.compile(dialect=engine.dialect)
    values = [compiled.params[name] for name in compiled.positiontup or []]
    args = ", ".join(str(v) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'" for v in values)
    async with engine.connect() as connection:
        raw = (await connection.get_raw_connection()).driver_connection
        await raw.execute(f"PREPARE page AS {compiled.string}")
        try:
            for _ in range(executions):
                await raw.execute(f"EXECUTE page({args})")
            rows = await raw.fetch(f"EXPLAIN EXECUTE page({args})")
        finally:
            await raw.execute("DEALLOCATE page")
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize("case", list(CASES))
async def test_listing_uses_an_index_as_the_app_runs_it(engine: AsyncEngine, case: str) -> None:
    request, build, index = CASES[case]
    plan = await explain_prepared(engine, build(await middle_id(engine)))
    print(f"\n-- {case} (prepared, 7th execution): {request}\n{plan}")
    assert "Seq Scan" not in plan, plan
    if index is not None:
        assert index in plan, f"expected {index}:\n{plan}"


# --- docs/query-plans.md --------------------------------------------------------------------------


async def document(engine: AsyncEngine) -> str:
    """docs/query-plans.md as the plans of this run make it."""
    after = await middle_id(engine)
    plans: dict[str, tuple[str, str]] = {}  # case -> (SQL, plan)
    prepared: dict[str, str] = {}  # case -> plan of the prepared statement
    for case, (_, build, _) in CASES.items():
        statement = build(after)
        plans[case] = (sql(statement), await explain(engine, statement))
        prepared[case] = await explain_prepared(engine, build(after))
    parts = [
        "# Query plans of the items listing (PostgreSQL)\n\n",
        "Generated by `tests/contract/test_item_query_plans.py` (delete this file and run the test to "
        "regenerate it), which fails when the plans it gets no longer match these, costs, row estimates, "
        "widths and ids aside. The statements are the ones `ItemRepository.page()` builds, compiled with "
        "literal values and run through `EXPLAIN` on a freshly migrated database holding "
        f"{ROWS:,} analysed items. Listing is keyset-paginated in id order (UUIDv7, i.e. creation "
        "order), so the first page and every later page are a short range scan of the primary key "
        "that stops after `limit + 1` rows, however deep the cursor is. A name prefix (`q`, matched "
        "against the case-folded `name_key` with LIKE wildcards escaped) uses `ix_items_name_key`, "
        "a `(name_key, id)` b-tree with `varchar_pattern_ops` so that `LIKE 'prefix%'` becomes an "
        "index range under any collation; a price range uses `ix_items_price` on `(price, id)`. "
        "For those two the matching rows are fetched by index and sorted by id before the limit, so "
        "their cost grows with the number of matches, not with the size of the table. The test "
        "fails if any of these plans uses a sequential scan of `items`.\n",
    ]
    for case, (request, _, _) in CASES.items():
        statement, plan = plans[case]
        parts.append(f"\n## {case}\n\n`{request}`\n\n```sql\n{statement}\n```\n\n```\n{plan}\n```\n")
    parts.append(
        "\n## The same statements as the app sends them\n\n"
        "The app does not send literal values: asyncpg prepares each statement once per connection "
        "and executes it with bound parameters, and from the sixth execution PostgreSQL may switch "
        "to a generic plan made without the values, which for the prefix and price filters walks "
        "the primary key and filters every row. The engine therefore sets "
        "`plan_cache_mode=force_custom_plan`; the plans below are of the seventh `EXECUTE` of the "
        "exact SQL SQLAlchemy sends, through the app's engine.\n"
    )
    for case, (request, _, _) in CASES.items():
        plan = prepared[case]
        parts.append(f"\n### {case} (prepared, 7th execution)\n\n`{request}`\n\n```\n{plan}\n```\n")
    return "".join(parts)


# The parts of a plan that change from run to run (or with the server's cost settings) without the
# plan changing: costs, row estimates and widths, ANALYZE's timings and loops, and the ids.
VOLATILE = [
    (re.compile(r"cost=\d+(?:\.\d+)?\.\.\d+(?:\.\d+)?"), "cost=..."),
    (re.compile(r"\b(rows|width|loops)=\d+"), r"\1=..."),
    (re.compile(r"actual time=\d+(?:\.\d+)?\.\.\d+(?:\.\d+)?"), "actual time=..."),
    (re.compile(r"\b(Planning|Execution) Time: \d+(?:\.\d+)? ms"), r"\1 Time: ... ms"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"[ \t]+$", re.MULTILINE), ""),
]


def normalised(markdown: str) -> str:
    for pattern, replacement in VOLATILE:
        markdown = pattern.sub(replacement, markdown)
    return markdown


@pytest.fixture(scope="module")
async def documented(engine: AsyncEngine) -> tuple[str, str]:
    """(the file's text, the text this run generates); writes the file when it is missing."""
    generated = await document(engine)
    if not DOCS.exists():
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(generated)
    return DOCS.read_text(), generated


def test_the_documented_plans_are_the_plans_postgresql_chooses(documented: tuple[str, str]) -> None:
    on_file, generated = (normalised(markdown).splitlines() for markdown in documented)
    if on_file != generated:
        diff = "\n".join(difflib.unified_diff(on_file, generated, "docs/query-plans.md (normalised)",
                                              "generated now (normalised)", lineterm=""))
        pytest.fail(
            "docs/query-plans.md does not match the plans PostgreSQL chooses now (costs, row "
            f"estimates, widths and ids are ignored):\n{diff}\n\nIf the change is intended, "
            f"regenerate the file: {REGENERATE}, then review and commit it.",
            pytrace=False,
        )


def test_the_documented_plans_match_the_indexes(documented: tuple[str, str]) -> None:
    """docs/query-plans.md names each case, its request and its index, and no sequential scan."""
    markdown, _ = documented
    for case, (request, _, index) in CASES.items():
        assert f"## {case}" in markdown, case
        assert request in markdown, request
        if index is not None:
            assert index in markdown, index
    assert "Seq Scan on items" not in markdown
