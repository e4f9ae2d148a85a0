"""The request edge: the transaction of a request and the authenticated principal."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import commit, rollback
from core.errors import Forbidden, Unauthorized
from core.security import InvalidToken, Principal

_SESSION = "atrium.db_session"  # kept in the ASGI scope: one per request


async def _session(request: Request) -> AsyncSession:
    session = request.scope.get(_SESSION)
    if session is None:
        session = request.scope[_SESSION] = request.app.state.sessions()
    return session


DbSession = Annotated[AsyncSession, Depends(_session)]


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
    session: AsyncSession | None = request.scope.pop(_SESSION, None)
    if session is None:
        return
    try:
        if ok:
            await commit(session)
        else:
            await rollback(session)
    finally:
        await session.close()


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
