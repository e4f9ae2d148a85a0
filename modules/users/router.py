"""Users HTTP API: sign up, token, me, get by id."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from core.edge.auth import CurrentPrincipal
from core.edge.provided import Provided
from core.edge.routes import DbSession, ReadSession, TransactionalRoute
from core.ratelimit.limiter import LoginRateLimit
from modules.users.schemas import TokenRead, UserCreate, UserRead
from modules.users.service import UserService

router = APIRouter(tags=["users"], route_class=TransactionalRoute)
Service = Annotated[UserService, Provided("users.service")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "not authenticated"},
    404: {"description": "not found"},
}


@router.post("/users", status_code=201, response_model=UserRead,
             responses={409: {"description": "email_taken"}})
async def sign_up(body: UserCreate, session: DbSession, service: Service) -> UserRead:
    """Create an account; a welcome email is sent by a background job."""
    user = await service.register(session, body.email, body.password, body.full_name, body.age)
    return UserRead.model_validate(user)


@router.post("/auth/token", response_model=TokenRead, dependencies=[LoginRateLimit],
             responses={401: {"description": "invalid_credentials"}, 429: {"description": "rate_limited"}})
async def issue_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], session: DbSession, service: Service
) -> TokenRead:
    """OAuth2 password flow: ``username`` is the email."""
    token, expires_in = await service.issue_token(session, form.username, form.password)
    return TokenRead(access_token=token, expires_in=expires_in)


@router.get("/users/me", response_model=UserRead, responses=_ERRORS)
async def read_me(principal: CurrentPrincipal, session: DbSession, service: Service) -> UserRead:
    """The authenticated caller's account."""
    return UserRead.model_validate(await service.me(session, principal))


@router.get("/users/{user_id}", response_model=UserRead, responses=_ERRORS)
async def read_user(
    user_id: uuid.UUID, principal: CurrentPrincipal, replica: ReadSession, primary: DbSession,
    service: Service,
) -> UserRead:
    """A user by id: yourself, or anyone if you are an admin; 404 otherwise."""
    return UserRead.model_validate(await service.get_visible(replica, principal, user_id, confirm_on=primary))
