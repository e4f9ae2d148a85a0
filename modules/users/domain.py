"""Users: the rules that hold whatever the transport or storage. Pure Python."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from core.edge.errors import Conflict, Forbidden, NotFound, Unauthorized, Unprocessable

MIN_AGE = 18
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128  # argon2 would accept more; a bound keeps hashing cost predictable


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    full_name: str
    age: int
    is_admin: bool
    created_at: datetime


def normalize_email(email: str) -> str:
    """Emails compare case-insensitively; store and look them up in one canonical form."""
    return email.strip().lower()


def welcome_email(full_name: str) -> tuple[str, str]:
    """Subject and body of the mail a new user receives."""
    first = full_name.split()[0] if full_name.split() else "there"
    return (
        "Welcome to Atrium",
        f"Hi {first},\n\nyour Atrium account is ready. Sign in with this email address.\n\n— Atrium",
    )


def check_password(password: str) -> None:
    """The password policy; the HTTP schema enforces the same bounds before this is reached."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise Unprocessable(
            f"The password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long.",
            code="weak_password",
        )


class EmailTaken(Conflict):
    code = "email_taken"

    def __init__(self) -> None:
        super().__init__("An account with this email already exists.")


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"

    def __init__(self) -> None:
        # One message for an unknown email and a wrong password: no account enumeration.
        super().__init__("The email or password is incorrect.")


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a sign-in or a refresh hands out: a short-lived access token and the session's next
    refresh token, with their lifetimes in seconds."""

    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


# Why a session was revoked (user_sessions.revoked_reason).
LOGOUT = "logout"
REFRESH_REUSED = "refresh_token_reused"
PASSWORD_CHANGED = "password_changed"
ACCOUNT_DISABLED = "account_disabled"


class AccountDisabled(Forbidden):
    """The password is right but the account is disabled: 403, other credentials would not help."""

    code = "account_disabled"

    def __init__(self) -> None:
        super().__init__("This account is disabled.")


class InvalidRefreshToken(Unauthorized):
    code = "invalid_refresh_token"

    def __init__(self) -> None:
        super().__init__("The refresh token is invalid.")


class RefreshTokenReused(Unauthorized):
    """A rotated refresh token came back: someone holds a copy. The session (all of its tokens) ends."""

    code = "refresh_token_reused"

    def __init__(self) -> None:
        super().__init__("This refresh token was already used; the session has been ended. Sign in again.")


class SessionEnded(Unauthorized):
    code = "session_ended"

    def __init__(self, why: str) -> None:
        super().__init__(f"The session has ended ({why}); sign in again.")


class WrongPassword(Forbidden):
    code = "wrong_password"

    def __init__(self) -> None:
        super().__init__("The current password is incorrect.")


class UnknownAccount(NotFound):
    code = "user_not_found"

    def __init__(self, email: str) -> None:
        super().__init__(f"No account has the email {email}.")
