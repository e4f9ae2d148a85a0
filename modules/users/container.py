"""The users module's providers; what it needs from core is declared, not imported."""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.stores import Cache
from core.email import EmailSender
from core.messaging.outbox import Outbox
from core.security import PasswordHasher, RefreshTokens, TokenService
from modules.users.authority import SessionAuthorities
from modules.users.repository import SessionRepository, UserRepository
from modules.users.service import UserService, UsersFacadeImpl


class UsersContainer(containers.DeclarativeContainer):
    settings: providers.Dependency[Any] = providers.Dependency()  # config.Settings, not imported by modules
    engine: providers.Dependency[AsyncEngine] = providers.Dependency()
    cache: providers.Dependency[Cache] = providers.Dependency()
    password_hasher: providers.Dependency[PasswordHasher] = providers.Dependency()
    tokens: providers.Dependency[TokenService] = providers.Dependency()
    outbox: providers.Dependency[Outbox] = providers.Dependency()
    email_sender: providers.Dependency[EmailSender] = providers.Dependency()
    metrics_registry: providers.Dependency[CollectorRegistry] = providers.Dependency()

    repository = providers.Singleton(UserRepository)
    session_repository = providers.Singleton(SessionRepository)
    refresh_tokens = providers.Singleton(
        RefreshTokens, settings.provided.secret_key, settings.provided.refresh_token_ttl_seconds
    )
    # core.security.AuthorityStore: build_container makes the core provider ``authority`` this one.
    authority = providers.Singleton(
        SessionAuthorities, engine, cache, session_repository, metrics_registry,
        local_seconds=settings.provided.auth_cache_seconds,
    )
    service = providers.Singleton(
        UserService, repository, session_repository, password_hasher, tokens, refresh_tokens, authority,
        outbox,
    )
    users_facade = providers.Singleton(UsersFacadeImpl, service)
