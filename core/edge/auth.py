"""Who is calling: the bearer token's principal, and the administrator check, as dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from core.edge.errors import Forbidden, Unauthorized
from core.security import InvalidToken, Principal, TokenService

_bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


async def _principal(request: Request, token: Annotated[str | None, Depends(_bearer)]) -> Principal:
    if not token:
        raise Unauthorized("Authentication required.", code="not_authenticated")
    tokens: TokenService = request.app.state.tokens
    try:
        return tokens.verify(token)
    except InvalidToken:
        raise Unauthorized("The access token is invalid or expired.", code="invalid_token") from None


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This action requires an administrator.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]
AdminPrincipal = Annotated[Principal, Depends(_admin)]
