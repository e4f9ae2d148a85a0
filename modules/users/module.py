"""Registration of the users module."""

from core.module import Module
from modules.users.container import UsersContainer
from modules.users.models import SessionRow, UserRow
from modules.users.public import UserRegistered
from modules.users.router import router
from modules.users.tasks import purge_sessions, send_welcome_email

MODULE = Module(
    name="users",
    container=UsersContainer,
    router=router,
    models=(UserRow, SessionRow),
    subscriptions={UserRegistered: (send_welcome_email,)},
    periodic=(purge_sessions,),
)
