"""HTTP models of the users API.

Every text a client sends is one line without control characters and every integer fits its
column (``core.edge.types``): a NUL or an out-of-range number is a 422 here, never a 500 from the
database. Passwords may hold any printable character (spaces too), but no control character.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from fastapi import Form
from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from core.edge.types import JSON_INTEGER, ONE_LINE, Int32, TextRule
from modules.users.domain import MAX_PASSWORD_LENGTH, MIN_AGE, MIN_PASSWORD_LENGTH

# ONE_LINE's characters, with a message that does not speak of lines (a password).
PRINTABLE = TextRule(ONE_LINE.forbidden, "must not contain control characters")
EMAIL_LENGTH = 320  # the column's



def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# EmailStr (email-validator) refuses an address under a special-use domain name (RFC 6761: .test,
# .local, .localhost, ...), which JSON Schema's `format: email` allows: the document says so too.
# `format: email` holds no control character already, so ONE_LINE is enforced but not restated.
SPECIAL_USE_DOMAIN = r"[.@](?:" + "|".join(_any_case(name) for name in SPECIAL_USE_DOMAIN_NAMES) + r")\.?$"
Email = Annotated[EmailStr, StringConstraints(max_length=EMAIL_LENGTH), ONE_LINE.unstated(),
                  Field(json_schema_extra={"not": {"pattern": SPECIAL_USE_DOMAIN}})]
FullName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                     ONE_LINE.filled()]
Password = Annotated[str, StringConstraints(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH),
                     PRINTABLE]
# A refresh token is 74 ASCII characters (core.security.RefreshTokens); the bound leaves room to change.
RefreshTokenText = Annotated[str, StringConstraints(min_length=1, max_length=512), ONE_LINE]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    password: Password
    full_name: FullName
    age: Annotated[Int32, Field(ge=MIN_AGE, le=150), JSON_INTEGER]


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    full_name: str
    age: int
    is_admin: bool
    created_at: datetime


class LoginForm:
    """The OAuth2 password form (``username`` is the email) with the rules of every other text field.

    The same fields as FastAPI's ``OAuth2PasswordRequestForm``, which the login rate limit reads
    from the same form; these are the ones the endpoint uses, validated before it runs.
    """

    def __init__(
        self,
        username: Annotated[str, Form(max_length=EMAIL_LENGTH), ONE_LINE],
        password: Annotated[str, Form(max_length=MAX_PASSWORD_LENGTH), PRINTABLE],
        grant_type: Annotated[str | None, Form(pattern="^password$")] = None,
        scope: Annotated[str, Form(max_length=1000), ONE_LINE] = "",
        client_id: Annotated[str | None, Form(max_length=200), ONE_LINE] = None,
        client_secret: Annotated[str | None, Form(max_length=200), ONE_LINE] = None,
    ) -> None:
        self.username = username
        self.password = password
        self.grant_type = grant_type
        self.scopes = scope.split()
        self.client_id = client_id
        self.client_secret = client_secret


class TokenRead(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds the access token is valid")
    refresh_token: str = Field(description="single use: POST it to /auth/refresh for the next pair")
    refresh_expires_in: int = Field(description="seconds the session lasts without a refresh")


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: RefreshTokenText


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD_LENGTH),
                                PRINTABLE]
    new_password: Password
