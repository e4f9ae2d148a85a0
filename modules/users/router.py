"""Users HTTP API: sign up, sessions (token, refresh, logout), password, me, get by id."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.session import UnitOfWork
from core.edge.auth import CurrentPrincipal
from core.edge.errors import AppError
from core.edge.openapi import errors, link, links
from core.edge.provided import Provided
from core.edge.routes import DbSession, ReadSession, TransactionalRoute
from core.ratelimit.limiter import LoginRateLimit, RateLimits
from modules.users.domain import TokenPair
from modules.users.schemas import LoginForm, PasswordChange, RefreshRequest, TokenRead, UserCreate, UserRead
from modules.users.service import UserService

router = APIRouter(tags=["users"], route_class=TransactionalRoute)
Service = Annotated[UserService, Provided("users.service")]
Limits = Annotated[RateLimits, Provided("rate_limits")]
Sessions = Annotated[async_sessionmaker[AsyncSession], Provided("sessions")]

# A bearer route's 401 (not_authenticated, invalid_token, account_disabled) comes with the bearer
# scheme, and every route's 422, 429 and 503 with the edge (core.edge.openapi). The login limits fail
# closed by default (ATRIUM_RATE_LIMIT_LOGIN_FAIL_OPEN): a limiter outage is a 503 on these routes.
_LOGIN_LIMITED = {429: "rate_limited", 503: "rate_limiter_unavailable"}


def _read(pair: TokenPair) -> TokenRead:
    return TokenRead(access_token=pair.access_token, expires_in=pair.expires_in,
                     refresh_token=pair.refresh_token, refresh_expires_in=pair.refresh_expires_in)


_SIGNED_UP = links(
    201,
    IssueToken=link("users.issue_token", "Log in as the new account.",
                    body={"username": "$request.body#/email", "password": "$request.body#/password"}),
)
_LOGGED_IN = links(
    200,
    Refresh=link("users.refresh", "Spend the refresh token.",
                 body={"refresh_token": "$response.body#/refresh_token"}),
)


@router.post("/users", status_code=201, response_model=UserRead,
             responses={**errors({409: "email_taken"}), **_SIGNED_UP})
async def sign_up(body: UserCreate, session: DbSession, service: Service) -> UserRead:
    """Create an account; a welcome email is sent by a background job."""
    user = await service.register(session, body.email, body.password, body.full_name, body.age)
    return UserRead.model_validate(user)


@router.post("/auth/token", response_model=TokenRead, dependencies=[LoginRateLimit],
             responses={**errors({401: "invalid_credentials", 403: "account_disabled", **_LOGIN_LIMITED}),
                        **_LOGGED_IN})
async def issue_token(
    form: Annotated[LoginForm, Depends()], session: DbSession, service: Service
) -> TokenRead:
    """OAuth2 password flow (``username`` is the email): opens a session, returns its token pair."""
    return _read(await service.issue_token(session, form.username, form.password))


@router.post("/auth/refresh", response_model=TokenRead,
             responses=errors({401: ["invalid_refresh_token", "refresh_token_reused", "session_ended",
                                     "account_disabled"], **_LOGIN_LIMITED}))
async def refresh(body: RefreshRequest, request: Request, sessions: Sessions, limits: Limits,
                  service: Service) -> TokenRead:
    """Spend a refresh token for a new pair. A token used twice ends its session (every token of it)."""
    await limits.check_login(request.scope, "refresh:" + body.refresh_token)
    # Its own unit of work, not the request's: a reused token is refused (401) *and* its session
    # revoked, and the request edge rolls back every 4xx.
    async with UnitOfWork(sessions) as session:
        outcome = await service.refresh(session, body.refresh_token)
    if isinstance(outcome, AppError):
        raise outcome
    return _read(outcome)


@router.post("/auth/logout", status_code=204, response_class=Response)
async def logout(principal: CurrentPrincipal, session: DbSession, service: Service) -> Response:
    """End the caller's session: its refresh token and access tokens stop working within a second."""
    await service.logout(session, principal)
    return Response(status_code=204)


@router.post("/users/me/password", status_code=204, response_class=Response,
             responses=errors({403: "wrong_password", **_LOGIN_LIMITED}))
async def change_password(body: PasswordChange, request: Request, principal: CurrentPrincipal,
                          session: DbSession, limits: Limits, service: Service) -> Response:
    """Change the caller's password; the account's other sessions end, this one stays."""
    await limits.check_login(request.scope, f"password:{principal.user_id}")  # guesses cost like logins
    await service.change_password(session, principal, body.current_password, body.new_password)
    return Response(status_code=204)


@router.get("/users/me", response_model=UserRead)
async def read_me(principal: CurrentPrincipal, session: DbSession, service: Service) -> UserRead:
    """The authenticated caller's account."""
    return UserRead.model_validate(await service.me(session, principal))


@router.get("/users/{user_id}", response_model=UserRead, responses=errors({404: "not_found"}))
async def read_user(
    user_id: uuid.UUID, principal: CurrentPrincipal, replica: ReadSession, primary: DbSession,
    service: Service,
) -> UserRead:
    """A user by id: yourself, or anyone if you are an admin; 404 otherwise."""
    return UserRead.model_validate(await service.get_visible(replica, principal, user_id, confirm_on=primary))
