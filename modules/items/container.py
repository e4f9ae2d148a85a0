"""The items module's providers."""

from __future__ import annotations

from dependency_injector import containers, providers

from core.cache.read_through import ReadThroughCache
from modules.items.repository import ItemRepository
from modules.items.service import ItemService, ItemsFacadeImpl


class ItemsContainer(containers.DeclarativeContainer):
    settings = providers.Dependency()
    sessions = providers.Dependency()
    cache = providers.Dependency()
    metrics_registry = providers.Dependency()
    outbox = providers.Dependency()
    cursors = providers.Dependency()

    repository = providers.Singleton(ItemRepository)
    item_cache = providers.Singleton(
        ReadThroughCache, cache, metrics_registry, name="items", ttl=settings.provided.items_cache_ttl
    )
    service = providers.Singleton(ItemService, repository, outbox, item_cache, cursors, sessions)
    items_facade = providers.Singleton(ItemsFacadeImpl, service)
