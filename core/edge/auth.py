"""Who is calling: the bearer token's principal as the account stands now, and the administrator
check, as dependencies.

A valid signature is not enough: the token names a session, and the ``AuthorityStore`` the
accounts module provides (``app.state.authority``) says whether that session is still live, whether
its account exists and is enabled, and whether it is an administrator *now*. A logout, a disabled
account or a revoked admin role takes effect within ``auth_cache_seconds`` (at most 1 s), not when
the token expires. Without a store (no module provides one) every bearer token is refused.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from core.edge.errors import Forbidden, Unauthorized
from core.security import AuthorityStore, InvalidToken, Principal, TokenService

_bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def _ended() -> Unauthorized:
    return Unauthorized("The session of this token has ended; sign in again.", code="invalid_token")


async def _principal(request: Request, token: Annotated[str | None, Depends(_bearer)]) -> Principal:
    if not token:
        raise Unauthorized("Authentication required.", code="not_authenticated")
    state = request.app.state
    tokens: TokenService = state.tokens
    try:
        claims = tokens.verify(token)
    except InvalidToken:
        raise Unauthorized("The access token is invalid or expired.", code="invalid_token") from None
    store: AuthorityStore | None = getattr(state, "authority", None)
    if store is None:
        raise _ended()
    current = await store.authority(claims.session_id)
    if current is None or current.principal.user_id != claims.user_id:
        raise _ended()  # no such session (or its account was deleted)
    if not current.active:
        raise Unauthorized("This account is disabled.", code="account_disabled")
    if current.revoked:
        raise _ended()
    return current.principal


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This action requires an administrator.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]
AdminPrincipal = Annotated[Principal, Depends(_admin)]
