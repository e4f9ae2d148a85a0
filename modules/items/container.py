"""The items module's providers."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.cache.read_through import ReadThroughCache
from core.cache.stores import Cache
from core.edge.pagination import CursorCodec
from core.messaging.outbox import Outbox
from modules.items.repository import ItemRepository
from modules.items.service import ItemService, ItemsFacadeImpl


class ItemsContainer(containers.DeclarativeContainer):
    settings: providers.Dependency[Any] = providers.Dependency()  # config.Settings, not imported by modules
    sessions: providers.Dependency[async_sessionmaker[AsyncSession]] = providers.Dependency()
    cache: providers.Dependency[Cache] = providers.Dependency()
    metrics_registry: providers.Dependency[CollectorRegistry] = providers.Dependency()
    outbox: providers.Dependency[Outbox] = providers.Dependency()
    cursors: providers.Dependency[CursorCodec] = providers.Dependency()

    repository = providers.Singleton(ItemRepository)
    item_cache = providers.Singleton(
        ReadThroughCache, cache, metrics_registry, name="items", ttl=settings.provided.items_cache_ttl
    )
    service = providers.Singleton(ItemService, repository, outbox, item_cache, cursors, sessions)
    items_facade = providers.Singleton(ItemsFacadeImpl, service)
