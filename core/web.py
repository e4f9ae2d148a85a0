"""The request edge: the transaction of a request and the authenticated principal."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from loguru import logger
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import commit, database_unavailable, rollback
from core.errors import Forbidden, Unauthorized
from core.security import InvalidToken, Principal

_SESSION = "atrium.db_session"  # kept in the ASGI scope: one per request
_READ_SESSION = "atrium.db_read_session"


async def _session(request: Request) -> AsyncSession:
    session = request.scope.get(_SESSION)
    if session is None:
        session = request.scope[_SESSION] = request.app.state.sessions()
    return session


DbSession = Annotated[AsyncSession, Depends(_session)]


async def _read_session(request: Request) -> AsyncSession:
    read_sessions = request.app.state.read_sessions
    if not read_sessions.replicated:
        return await _session(request)  # no replicas: the request's one session, one connection
    session = request.scope.get(_READ_SESSION)
    if session is None:
        session = request.scope[_READ_SESSION] = await read_sessions.open()
    return session


# A session for read-only use cases: on a read replica (round-robin), on the primary when none
# answers (core.db.ReadSessions). Never committed: TransactionalRoute closes it, which rolls it
# back. Without replicas it is the request's DbSession. It may lag the primary by the replication
# delay, so a read that must see the caller's own write of a moment ago takes DbSession instead
# (README "Read replicas").
ReadSession = Annotated[AsyncSession, Depends(_read_session)]


class TransactionalRoute(APIRoute):
    """Commits the request's session after the endpoint succeeds and before the response is sent.

    The one commit of a request lives here; a 4xx/5xx response or an exception rolls back.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except BaseException:
                await _finish(request, ok=False)
                raise
            await _finish(request, ok=response.status_code < 400)
            return response

        return run


async def _finish(request: Request, *, ok: bool) -> None:
    reader: AsyncSession | None = request.scope.pop(_READ_SESSION, None)
    session: AsyncSession | None = request.scope.pop(_SESSION, None)
    try:
        if session is None:
            return
        try:
            if ok:
                await commit(session)
            else:
                await rollback(session)
        finally:
            await session.close()
    finally:
        if reader is not None:
            await _close_reader(reader)


async def _close_reader(reader: AsyncSession) -> None:
    """Roll back and release a read session; a replica lost meanwhile can't spoil the answer."""
    try:
        await reader.close()
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        logger.warning("closing a read session failed: {}", type(exc).__name__)


_bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


async def _principal(request: Request, token: Annotated[str | None, Depends(_bearer)]) -> Principal:
    if not token:
        raise Unauthorized("Authentication required.", code="not_authenticated")
    try:
        return request.app.state.tokens.verify(token)
    except InvalidToken:
        raise Unauthorized("The access token is invalid or expired.", code="invalid_token") from None


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This action requires an administrator.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]
AdminPrincipal = Annotated[Principal, Depends(_admin)]
