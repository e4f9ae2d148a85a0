"""The users module's providers; what it needs from core is declared, not imported."""

from __future__ import annotations

from dependency_injector import containers, providers

from core.email import EmailSender
from core.messaging.outbox import Outbox
from core.security import PasswordHasher, TokenService
from modules.users.repository import UserRepository
from modules.users.service import UserService, UsersFacadeImpl


class UsersContainer(containers.DeclarativeContainer):
    password_hasher: providers.Dependency[PasswordHasher] = providers.Dependency()
    tokens: providers.Dependency[TokenService] = providers.Dependency()
    outbox: providers.Dependency[Outbox] = providers.Dependency()
    email_sender: providers.Dependency[EmailSender] = providers.Dependency()

    repository = providers.Singleton(UserRepository)
    service = providers.Singleton(UserService, repository, password_hasher, tokens, outbox)
    users_facade = providers.Singleton(UsersFacadeImpl, service)
