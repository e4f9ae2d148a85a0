"""The users domain: pure rules, no database or web framework."""

from __future__ import annotations

import pytest

from core.edge.errors import AppError, Conflict, Unauthorized
from modules.users.domain import EmailTaken, InvalidCredentials, normalize_email, welcome_email


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada@Example.COM", "ada@example.com"),
        ("  ada@example.com\t\n", "ada@example.com"),
        (" MiXeD.Case+Tag@Sub.Example.Org ", "mixed.case+tag@sub.example.org"),
    ],
)
def test_normalize_email_trims_and_lowercases(raw: str, normalized: str) -> None:
    assert normalize_email(raw) == normalized


def test_normalize_email_is_idempotent() -> None:
    once = normalize_email("  Grace.Hopper@Navy.MIL ")

    assert normalize_email(once) == once


def test_welcome_email_greets_by_first_name() -> None:
    subject, body = welcome_email("Ada King Lovelace")

    assert subject == "Welcome to Atrium"
    assert body.startswith("Hi Ada,\n")
    assert "King" not in body
    assert "Lovelace" not in body


def test_welcome_email_ignores_surrounding_whitespace() -> None:
    _, body = welcome_email("   Grace   Hopper ")

    assert body.startswith("Hi Grace,")


@pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
def test_welcome_email_without_a_name_says_there(empty: str) -> None:
    subject, body = welcome_email(empty)

    assert subject == "Welcome to Atrium"
    assert body.startswith("Hi there,")


def test_welcome_email_mentions_signing_in() -> None:
    _, body = welcome_email("Ada")

    assert "Sign in with this email address" in body


def test_email_taken_is_a_409_conflict() -> None:
    error = EmailTaken()

    assert isinstance(error, Conflict)
    assert isinstance(error, AppError)
    assert error.status == 409
    assert error.code == "email_taken"
    assert error.message == "An account with this email already exists."
    assert str(error) == error.message
    assert error.details == {}


def test_invalid_credentials_is_a_401_with_a_bearer_challenge() -> None:
    error = InvalidCredentials()

    assert isinstance(error, Unauthorized)
    assert error.status == 401
    assert error.code == "invalid_credentials"
    assert error.message == "The email or password is incorrect."
    assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_both_login_failures_share_one_message() -> None:
    """An unknown email and a wrong password raise the same error: no account enumeration."""
    unknown_email, wrong_password = InvalidCredentials(), InvalidCredentials()

    assert (unknown_email.status, unknown_email.code, unknown_email.message) == (
        wrong_password.status, wrong_password.code, wrong_password.message,
    )
    assert "email" in unknown_email.message.lower()
    assert "password" in unknown_email.message.lower()


def test_domain_errors_do_not_share_mutable_details() -> None:
    first, second = EmailTaken(), EmailTaken()
    first.details["x"] = 1

    assert second.details == {}
