"""The real servers the tests talk to, and what happens when one is missing.

Locally a missing server skips the tests that need it; under ``CI=true`` it fails them, so a
green CI run always means the real adapters were exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
from functools import cache

import pytest

POSTGRES_HOST = os.environ.get("ATRIUM_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("ATRIUM_TEST_PG_PORT", "5432"))
POSTGRES_USER = os.environ.get("ATRIUM_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("ATRIUM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("ATRIUM_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

_PORTS = {
    "postgres": (POSTGRES_HOST, POSTGRES_PORT),
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@cache
def _reachable(name: str) -> bool:
    host, port = _PORTS[name]
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(name: str) -> None:
    """Skip (locally) or fail (under CI=true) the calling test when server ``name`` is down."""
    if _reachable(name):
        return
    host, port = _PORTS[name]
    message = f"{name} is not reachable at {host}:{port}"
    if in_ci():
        pytest.fail(f"{message}; CI requires every real service", pytrace=False)
    pytest.skip(message)


def require_program(*candidates: str, package: str) -> str:
    """The first of ``candidates`` (names on PATH, or absolute paths) that exists; skips the calling
    test locally and fails it under CI=true when none does. ``package``: the Debian package that
    brings it (scripts/services installs it)."""
    for candidate in candidates:
        absolute = os.path.isabs(candidate) and os.path.exists(candidate)
        found = shutil.which(candidate) or (candidate if absolute else None)
        if found:
            return found
    message = f"{candidates[0]} is not installed (apt-get install -y {package}; scripts/services installs it)"
    if in_ci():
        pytest.fail(f"{message}; CI requires it", pytrace=False)
    pytest.skip(message)


def postgres_dsn(database: str, driver: str = "postgresql+asyncpg") -> str:
    return f"{driver}://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"
