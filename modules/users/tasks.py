"""Users jobs: the welcome mail, and the periodic purge of ended sessions."""

from __future__ import annotations

from loguru import logger

from core.email import EmailMessage
from core.messaging.periodic import PeriodicContext, periodic
from core.messaging.queue import JobContext, task
from modules.users.domain import welcome_email
from modules.users.public import UserRegistered


@task("users.send_welcome_email")
async def send_welcome_email(ctx: JobContext, event: UserRegistered) -> None:
    """Mail a new user, once per registration even if the message is delivered twice.

    The inbox skips a second delivery. A worker killed between the mail's acceptance and the job's
    commit sends it again, with the same Message-ID (its key), which receivers drop as a copy.
    """
    subject, body = welcome_email(event.full_name)
    await ctx.container.email_sender().send(
        EmailMessage(to=event.email, subject=subject, body=body, key=f"users.welcome.{event.user_id}"))


@periodic("users.purge_sessions", every="users_session_purge_interval_seconds")
async def purge_sessions(ctx: PeriodicContext) -> None:
    """Delete sessions that ended more than ``users_session_retention_days`` ago."""
    retention = ctx.container.settings().users_session_retention_days
    async with ctx.unit_of_work() as session:
        purged = await ctx.container.service().purge_sessions(session, retention)
    if purged:
        logger.info("users: purged {} session(s) that ended more than {:g} day(s) ago", purged, retention)
