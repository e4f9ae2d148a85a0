"""Settings for tests: the test profile, and the overrides the suites share."""

from __future__ import annotations

from typing import Any

from config import Settings

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
CHEAP_HASHING = {"password_time_cost": 1, "password_memory_cost": 1024}
# The session stacks serve the whole suite from one client address: limits it never reaches (a
# string, so the worker's environment carries it too). tests/api/test_rate_limits.py sets tight ones.
GENEROUS_RATE_LIMITS = {
    "rate_limits": "default=1000000/minute,auth_client=1000000/minute,auth_account=1000000/minute"
}


def make_settings(**overrides: Any) -> Settings:
    """Test-profile settings with cheap password hashing; ``overrides`` win.

    A developer's ``.env`` is not read (``_env_file=None``): enabling a module there for `make run`
    (README "Add a module") must not change what the tests build.
    """
    values: dict[str, Any] = {"env": "test", "log_level": "WARNING", "secret_key": TEST_SECRET}
    values.update(overrides)
    return Settings(_env_file=None, **values)
