"""Settings: profiles, environment overrides, and production's refusal to start unsafe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import main
from config import ConfigError, Environment, Settings, load_settings
from config.settings import DEV_SECRET

GOOD_SECRET = "production-secret-0123456789-abcdefghijklmnop"

PRODUCTION = {
    "ATRIUM_ENV": "production",
    "ATRIUM_SECRET_KEY": GOOD_SECRET,
    "ATRIUM_DATABASE_URL": "postgresql+asyncpg://atrium@db:5432/atrium",
    "ATRIUM_REDIS_URL": "redis://cache:6379/0",
    "ATRIUM_BROKER_URL": "redis://queue:6379/1",
    "ATRIUM_SMTP_HOST": "smtp.example.com",
    "ATRIUM_PAYMENTS_URL": "https://gateway.example.com",
    "ATRIUM_PAYMENTS_API_KEY": "gateway-api-key",
    "ATRIUM_PAYMENTS_WEBHOOK_SECRET": "whsec-0123456789abcdef",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ATRIUM_* variable from the caller's shell, and no ``.env`` file in the CWD."""
    for name in list(os.environ):
        if name.upper().startswith("ATRIUM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def set_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def production(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> None:
    """The complete production environment with ``changes`` applied (None removes a variable)."""
    values = {**PRODUCTION}
    for name, value in changes.items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    set_env(monkeypatch, values)


# --- profiles -----------------------------------------------------------------------------------


def test_development_is_the_default_profile() -> None:
    settings = load_settings()

    assert settings.env is Environment.DEVELOPMENT
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.is_sqlite
    assert settings.cache_backend == "memory"
    assert settings.broker_backend == "stub"
    assert settings.email_backend == "console"
    assert settings.auto_migrate is True
    assert settings.run_worker_in_process is True
    assert settings.secret_key == DEV_SECRET
    assert settings.modules == ("users", "items", "billing")
    assert settings.payments_backend == "fake"


def test_test_profile_keeps_mail_in_memory_and_hashes_cheaply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_ENV", "test")

    settings = load_settings()

    assert settings.env is Environment.TEST
    assert settings.email_backend == "memory"
    assert settings.cache_backend == "memory"
    assert settings.broker_backend == "stub"
    assert settings.is_sqlite
    assert settings.password_time_cost == 1
    assert settings.password_memory_cost == 1024


def test_production_profile_selects_server_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch)

    settings = load_settings()

    assert settings.env is Environment.PRODUCTION
    assert settings.cache_backend == "redis"
    assert settings.broker_backend == "redis"
    assert settings.email_backend == "smtp"
    assert settings.auto_migrate is False
    assert settings.run_worker_in_process is False
    assert settings.log_json is True
    assert not settings.is_sqlite


def test_environment_variables_override_profile_values(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, {
        "ATRIUM_ENV": "development",
        "ATRIUM_DATABASE_URL": "postgresql+asyncpg://me@localhost/dev",
        "ATRIUM_CACHE_BACKEND": "redis",
        "ATRIUM_REDIS_URL": "redis://localhost:6379/0",
        "ATRIUM_EMAIL_BACKEND": "memory",
        "ATRIUM_AUTO_MIGRATE": "false",
        "ATRIUM_RUN_WORKER_IN_PROCESS": "0",
        "ATRIUM_PORT": "9001",
    })

    settings = load_settings()

    assert settings.database_url == "postgresql+asyncpg://me@localhost/dev"
    assert settings.cache_backend == "redis"
    assert settings.email_backend == "memory"
    assert settings.auto_migrate is False
    assert settings.run_worker_in_process is False
    assert settings.port == 9001
    assert settings.broker_backend == "stub"  # what was not overridden keeps the profile's value


def test_test_profile_values_are_overridable_too(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, {"ATRIUM_ENV": "test", "ATRIUM_PASSWORD_TIME_COST": "4",
                          "ATRIUM_LOG_LEVEL": "DEBUG"})

    settings = load_settings()

    assert settings.password_time_cost == 4
    assert settings.log_level == "DEBUG"


def test_keyword_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_PORT", "9001")

    assert load_settings(port=9002).port == 9002


def test_modules_parse_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_MODULES", "users, items")

    settings = load_settings()

    assert settings.modules == ("users", "items")
    assert settings.payments_backend == "fake"
    assert isinstance(settings.modules, tuple)


def test_modules_ignore_empty_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_MODULES", " users ,, billing , ")

    assert load_settings().modules == ("users", "billing")


def test_no_read_replicas_by_default() -> None:
    settings = load_settings()

    assert settings.database_replica_urls == ()
    assert settings.database_replica_cooloff == 5.0
    assert settings.database_connect_timeout == 5.0


def test_read_replicas_parse_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, {
        "ATRIUM_DATABASE_URL": "postgresql+asyncpg://atrium@db:5432/atrium",
        "ATRIUM_DATABASE_REPLICA_URLS": " postgresql+asyncpg://atrium@r1:5432/atrium,,"
                                        "postgresql+asyncpg://atrium@r2:5432/atrium ",
    })

    assert load_settings().database_replica_urls == (
        "postgresql+asyncpg://atrium@r1:5432/atrium", "postgresql+asyncpg://atrium@r2:5432/atrium")


@pytest.mark.parametrize(("primary", "replicas", "message"), [
    ("sqlite+aiosqlite:///./var/a.db", "postgresql+asyncpg://atrium@r1/atrium", "needs a PostgreSQL"),
    ("postgresql+asyncpg://atrium@db/atrium", "mysql://u:hunter2@r1/atrium", "mysql:// is not supported"),
    ("postgresql+asyncpg://atrium@db/atrium", "postgresql://u:hunter2@r1/atrium", "use postgresql\\+asyncpg://"),
    ("postgresql+asyncpg://atrium@db/atrium", "sqlite+aiosqlite:///./r.db", "sqlite\\+aiosqlite:// is not"),
])
def test_read_replicas_must_be_postgresql(
    monkeypatch: pytest.MonkeyPatch, primary: str, replicas: str, message: str
) -> None:
    set_env(monkeypatch, {"ATRIUM_DATABASE_URL": primary, "ATRIUM_DATABASE_REPLICA_URLS": replicas})

    with pytest.raises(ConfigError, match=message) as raised:
        load_settings()
    assert "hunter2" not in str(raised.value)


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_invalid_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_ENV", "staging")

    with pytest.raises(ConfigError, match="ATRIUM_ENV='staging'") as caught:
        load_settings()

    assert "development" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_invalid_value_is_a_one_line_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ATRIUM_CACHE_BACKEND", "memcached")

    with pytest.raises(ConfigError, match="ATRIUM_CACHE_BACKEND") as caught:
        load_settings()

    assert "\n" not in str(caught.value)


# --- production refuses unsafe configurations -----------------------------------------------------


def test_a_complete_production_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch)

    settings = load_settings()

    assert settings.secret_key == GOOD_SECRET
    assert settings.database_url == PRODUCTION["ATRIUM_DATABASE_URL"]
    assert settings.redis_url == PRODUCTION["ATRIUM_REDIS_URL"]
    assert settings.broker_url == PRODUCTION["ATRIUM_BROKER_URL"]
    assert settings.smtp_host == PRODUCTION["ATRIUM_SMTP_HOST"]


def test_production_with_rabbitmq_and_console_email_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch, ATRIUM_BROKER_BACKEND="rabbitmq", ATRIUM_BROKER_URL="amqp://mq:5672/",
               ATRIUM_EMAIL_BACKEND="console", ATRIUM_SMTP_HOST=None)

    settings = load_settings()

    assert settings.broker_backend == "rabbitmq"
    assert settings.email_backend == "console"


@pytest.mark.parametrize(
    ("changes", "variable", "fragment"),
    [
        pytest.param({"ATRIUM_SECRET_KEY": None}, "ATRIUM_SECRET_KEY", "unset", id="secret-unset"),
        pytest.param({"ATRIUM_SECRET_KEY": DEV_SECRET}, "ATRIUM_SECRET_KEY", "development default",
                     id="secret-dev-default"),
        pytest.param({"ATRIUM_SECRET_KEY": "short-secret"}, "ATRIUM_SECRET_KEY", "32 characters",
                     id="secret-too-short"),
        pytest.param({"ATRIUM_DATABASE_URL": None}, "ATRIUM_DATABASE_URL", "required",
                     id="database-missing"),
        pytest.param({"ATRIUM_DATABASE_URL": "sqlite+aiosqlite:///./prod.db"}, "ATRIUM_DATABASE_URL",
                     "SQLite", id="database-sqlite"),
        pytest.param({"ATRIUM_REDIS_URL": None}, "ATRIUM_REDIS_URL", "required", id="redis-missing"),
        pytest.param({"ATRIUM_BROKER_BACKEND": "stub"}, "ATRIUM_BROKER_BACKEND", "stub",
                     id="broker-stub"),
        pytest.param({"ATRIUM_BROKER_URL": None}, "ATRIUM_BROKER_URL", "required",
                     id="broker-url-missing"),
        pytest.param({"ATRIUM_SMTP_HOST": None}, "ATRIUM_SMTP_HOST", "required", id="smtp-missing"),
        pytest.param({"ATRIUM_PAYMENTS_BACKEND": "fake"}, "ATRIUM_PAYMENTS_BACKEND", "fake",
                     id="payments-fake"),
        pytest.param({"ATRIUM_PAYMENTS_URL": None}, "ATRIUM_PAYMENTS_URL", "required",
                     id="payments-url-missing"),
        pytest.param({"ATRIUM_PAYMENTS_API_KEY": None}, "ATRIUM_PAYMENTS_API_KEY", "required",
                     id="payments-key-missing"),
        pytest.param({"ATRIUM_PAYMENTS_WEBHOOK_SECRET": None}, "ATRIUM_PAYMENTS_WEBHOOK_SECRET", "16+",
                     id="payments-webhook-secret-missing"),
        pytest.param({"ATRIUM_PAYMENTS_WEBHOOK_SECRET": "short"}, "ATRIUM_PAYMENTS_WEBHOOK_SECRET", "16+",
                     id="payments-webhook-secret-short"),
    ],
)
def test_production_refuses_an_unsafe_config(
    monkeypatch: pytest.MonkeyPatch, changes: dict[str, str | None], variable: str, fragment: str
) -> None:
    production(monkeypatch, **changes)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    assert variable in message
    assert fragment in message
    assert "\n" not in message
    assert "validation error" not in message.lower()  # pydantic's wrapper is unwrapped


def test_the_secret_length_boundary_is_32_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch, ATRIUM_SECRET_KEY="x" * 32)
    assert load_settings().secret_key == "x" * 32

    production(monkeypatch, ATRIUM_SECRET_KEY="x" * 31)
    with pytest.raises(ConfigError, match="ATRIUM_SECRET_KEY"):
        load_settings()


def test_development_tolerates_what_production_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, {"ATRIUM_ENV": "development", "ATRIUM_SECRET_KEY": "short",
                          "ATRIUM_BROKER_BACKEND": "stub", "ATRIUM_DATABASE_URL": "sqlite+aiosqlite:///./d.db"})

    settings = load_settings()

    assert settings.secret_key == "short"
    assert settings.broker_backend == "stub"
    assert settings.is_sqlite


def test_a_dotenv_file_in_the_cwd_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ATRIUM_PORT=7777\n")

    assert Settings().port == 7777


# --- the CLI turns a bad config into one line on stderr ------------------------------------------


def test_cli_reports_a_bad_production_config_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    production(monkeypatch, ATRIUM_SECRET_KEY=DEV_SECRET)

    status = main.cli(["modules"])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("atrium: ")
    assert "ATRIUM_SECRET_KEY" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_reports_an_unknown_env_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATRIUM_ENV", "prod")

    status = main.cli(["modules"])

    assert status == 2
    assert capsys.readouterr().err.strip() == (
        "atrium: ATRIUM_ENV='prod' is not one of development, test, production"
    )


def test_cli_modules_runs_with_a_good_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    production(monkeypatch)

    status = main.cli(["modules"])

    captured = capsys.readouterr()
    assert status == 0
    assert captured.err == ""
    assert captured.out.startswith("users")


def test_production_without_billing_needs_no_payment_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch, ATRIUM_MODULES="users,items", ATRIUM_PAYMENTS_URL=None,
               ATRIUM_PAYMENTS_API_KEY=None, ATRIUM_PAYMENTS_WEBHOOK_SECRET=None)

    assert load_settings().modules == ("users", "items")
