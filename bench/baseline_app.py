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

Imports nothing from Atrium on purpose: the baseline must not inherit the product's costs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import asyncpg
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

_SELECT_ITEM = (
    "SELECT id, name, description, price, currency, created_at, updated_at FROM items WHERE id = $1"
)


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
