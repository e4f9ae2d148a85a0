"""Baselines for ``bench/run.py``: what plain FastAPI does with the same work, and nothing more.

Two routes, served by one uvicorn worker with the same options as ``atrium serve``:

- ``GET /items/{item_id}``: bare FastAPI. It returns a fixed pydantic model holding exactly the
  item the product serves (read once, at startup, from ``BENCH_ITEM_JSON`` or the file named by
  ``BENCH_ITEM_JSON_FILE``), so the bytes on the wire match the product's warm-cache response.
  This is the ceiling for the product's warm path: routing, validation of the path parameter and
  serialization of the same payload, with no middleware, no dependency injection, no cache.
- ``GET /db/items/{item_id}``: the same row read with raw asyncpg (a pool opened in the lifespan,
  DSN from ``BENCH_PG_DSN``) and returned as the same model. The ceiling for the product's cold
  (database) path.
- ``POST /db/items``: what the product's ``POST /api/v1/items`` does to the database, with raw
  asyncpg: the body validated by a pydantic model with the same constraints, one ``INSERT`` of
  the same columns (a UUIDv7 id, the case-folded ``name_key``, version, timestamps) in one
  transaction, committed, answered 201 with the created item and a ``Location`` header. The
  product's ``ItemService.create`` writes no outbox row (nothing subscribes to a creation), so
  neither does this. The bearer token is sent but not checked: verifying it is the product's cost.

Imports nothing from Atrium on purpose: the baseline must not inherit the product's costs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import asyncpg
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

_SELECT_ITEM = (
    "SELECT id, name, description, price, currency, created_at, updated_at FROM items WHERE id = $1"
)


_INSERT_ITEM = (
    "INSERT INTO items (id, name, name_key, description, price, currency, version, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8)"
)


def _uuid7() -> uuid.UUID:
    """A UUIDv7, as the product's ids (time-ordered: b-tree inserts stay local)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62
    return uuid.UUID(int=value | rand & ((1 << 62) - 1))


class ItemCreate(BaseModel):
    """The product's ``ItemCreate`` constraints (currency checked for shape only)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(strip_whitespace=True, max_length=4000)] = ""
    price: Annotated[int, Field(ge=0, le=10**13, strict=True)]
    currency: Annotated[str, StringConstraints(min_length=3, max_length=3, to_upper=True)]


class Item(BaseModel):
    """Field for field the product's ``ItemRead``: same names, types and order."""

    id: uuid.UUID
    name: str
    description: str
    price: int
    currency: str
    created_at: datetime
    updated_at: datetime


def _fixed_item() -> Item | None:
    raw = os.environ.get("BENCH_ITEM_JSON")
    path = os.environ.get("BENCH_ITEM_JSON_FILE")
    if raw is None and path:
        raw = Path(path).read_text(encoding="utf-8")
    return Item.model_validate(json.loads(raw)) if raw else None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.item = _fixed_item()
    dsn = os.environ.get("BENCH_PG_DSN")
    app.state.pool = None
    if dsn:
        app.state.pool = await asyncpg.create_pool(
            dsn,
            min_size=int(os.environ.get("BENCH_PG_POOL_MIN", "10")),
            max_size=int(os.environ.get("BENCH_PG_POOL_MAX", "20")),
        )
    try:
        yield
    finally:
        if app.state.pool is not None:
            await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}", response_model=Item)
async def read_item(item_id: uuid.UUID) -> Item:
    """The fixed item, whatever the id (the product's warm path serves one cached item)."""
    item: Item | None = app.state.item
    if item is None:
        raise HTTPException(404, "no item configured (BENCH_ITEM_JSON / BENCH_ITEM_JSON_FILE)")
    return item


@app.get("/db/items/{item_id}", response_model=Item)
async def read_item_from_db(item_id: uuid.UUID) -> Item:
    """The row by primary key with raw asyncpg: one pooled connection, one prepared statement."""
    pool: asyncpg.Pool | None = app.state.pool
    if pool is None:
        raise HTTPException(503, "no database configured (BENCH_PG_DSN)")
    async with pool.acquire() as connection:
        row = await connection.fetchrow(_SELECT_ITEM, item_id)
    if row is None:
        raise HTTPException(404, "item not found")
    return Item.model_validate(dict(row))


@app.post("/db/items", status_code=201, response_model=Item)
async def create_item_in_db(body: ItemCreate, response: Response) -> Item:
    """One INSERT in one transaction with raw asyncpg, as the product's create does."""
    pool: asyncpg.Pool | None = app.state.pool
    if pool is None:
        raise HTTPException(503, "no database configured (BENCH_PG_DSN)")
    now = datetime.now(UTC)
    item = Item(id=_uuid7(), name=body.name, description=body.description, price=body.price,
                currency=body.currency, created_at=now, updated_at=now)
    name_key = " ".join(item.name.casefold().split())[:200]
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(_INSERT_ITEM, item.id, item.name, name_key, item.description,
                                 item.price, item.currency, now, now)
    response.headers["Location"] = f"/db/items/{item.id}"
    return item
