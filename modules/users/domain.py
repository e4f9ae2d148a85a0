"""Users: the rules that hold whatever the transport or storage. Pure Python."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from core.edge.errors import Conflict, Unauthorized, Unprocessable

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
