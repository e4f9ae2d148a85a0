"""Alembic environment: the metadata of every enabled module, on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from config import load_settings
from core.db.base import Base
from core.db.engine import create_engine
from core.module import load_modules

config = context.config
settings = config.attributes.get("settings") or load_settings()

import core.edge.idempotency  # noqa: E402  - the idempotency keys
import core.messaging.outbox  # noqa: E402  - the outbox and inbox tables
import core.messaging.publications  # noqa: E402,F401  - the event-publication registry

load_modules(settings.modules)  # importing each module registers its tables on Base.metadata
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
        on_version_apply=config.attributes.get("on_version_apply"),  # upgrade() reports each step
    )
    with context.begin_transaction():
        context.run_migrations()


async def _online() -> None:
    engine = create_engine(settings.database_url, pool_pre_ping=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=settings.database_url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online())
