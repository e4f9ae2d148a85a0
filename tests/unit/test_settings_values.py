"""Values no profile may get wrong: each refused as one line naming the variable, never quoting a
password from a URL (config/settings.py "values no profile may get wrong")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from config.settings import LOG_LEVELS, check_database_url, check_server_url

SECRET = "hunter2-in-a-url"
EXAMPLE = "(e.g. redis://host:6379/0)"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ATRIUM_* variable from the caller's shell, and no ``.env`` file in the CWD."""
    for name in list(os.environ):
        if name.upper().startswith("ATRIUM_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)  # these tests read .env files
    monkeypatch.chdir(tmp_path)


def refused(call: object, *args: object, **kwargs: object) -> str:
    """The message of the ConfigError ``call(*args, **kwargs)`` raises, checked to be one line
    without the URL's password."""
    assert callable(call)
    with pytest.raises(ConfigError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


def settings_with(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    """The one-line refusal of ``load_settings()`` with these ATRIUM_* variables."""
    for name, value in variables.items():
        monkeypatch.setenv(f"ATRIUM_{name.upper()}", value)
    return refused(load_settings)


# --- database URLs --------------------------------------------------------------------------------


class TestDatabaseUrl:
    @pytest.mark.parametrize("url", [
        f"postgresql+asyncpg://atrium:{SECRET}@db:5432/atrium",
        "postgresql+asyncpg://atrium@db/atrium?ssl=require",
        "postgresql+asyncpg://atrium@/atrium?host=/run/postgresql",
        "postgresql+asyncpg://atrium@db/atrium?prepared_statement_cache_size=0",
        "sqlite+aiosqlite:///./var/atrium.db",
        "sqlite+aiosqlite:////srv/atrium/atrium.db",
    ])
    def test_the_async_drivers_are_accepted(self, url: str) -> None:
        check_database_url("ATRIUM_DATABASE_URL", url)

    @pytest.mark.parametrize(("url", "says"), [
        (f"postgresql://atrium:{SECRET}@db/atrium", "postgresql:// names no driver; use postgresql+asyncpg://"),
        (f"postgres://atrium:{SECRET}@db/atrium", "postgres:// names no driver; use postgresql+asyncpg://"),
        (f"postgresql+psycopg2://atrium:{SECRET}@db/atrium",
         "the driver 'psycopg2' is not supported; use postgresql+asyncpg://"),
        ("sqlite:///./var/atrium.db", "sqlite:// names no driver; use sqlite+aiosqlite:///"),
        ("sqlite+pysqlite:///./var/atrium.db",
         "the driver 'pysqlite' is not supported; use sqlite+aiosqlite"),
        (f"mysql+aiomysql://atrium:{SECRET}@db/atrium",
         "mysql+aiomysql:// is not supported; expected postgresql+asyncpg://user:password@host:5432/atrium "
         "or sqlite+aiosqlite:///./var/atrium.db"),
        (f"postgresql+asyncpg://atrium:{SECRET}@db/atrium?ssl=on",
         "?ssl= must be one of disable, allow, prefer, require, verify-ca, verify-full"),
        ("garbage", "is not a database URL"),
        (f"postgresql+asyncpg://atrium:{SECRET}@db:5432x/atrium", "its port is not a number"),
        (f"postgresql+asyncpg://atrium:{SECRET}@db:0/atrium", "port 0 is out of range (1-65535)"),
        (f"postgresql+asyncpg://atrium:{SECRET}@db/atrium?sslmode=require",
         "?sslmode= is not an asyncpg connection option; asyncpg calls it ssl"),
        (f"postgresql+asyncpg://atrium:{SECRET}@db/atrium?application=atrium",
         "?application= is not an asyncpg connection option"),
    ])
    def test_what_cannot_work_is_refused_with_the_fix(self, url: str, says: str) -> None:
        message = refused(check_database_url, "ATRIUM_DATABASE_URL", url)

        assert message.startswith("ATRIUM_DATABASE_URL")
        assert says in message

    def test_replicas_take_postgresql_only(self) -> None:
        message = refused(check_database_url, "ATRIUM_DATABASE_REPLICA_URLS", "sqlite+aiosqlite:///./r.db",
                          postgres_only=True)

        assert message == ("ATRIUM_DATABASE_REPLICA_URLS: sqlite+aiosqlite:// is not supported; expected "
                           "postgresql+asyncpg://user:password@host:5432/atrium")

    def test_the_environment_variable_is_checked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        message = settings_with(monkeypatch, database_url=f"postgresql://atrium:{SECRET}@db/atrium")

        assert message.startswith("ATRIUM_DATABASE_URL: postgresql:// names no driver")

    @pytest.mark.parametrize("env", ["development", "test", "production"])
    def test_an_empty_database_url_is_refused_in_every_profile(
        self, monkeypatch: pytest.MonkeyPatch, env: str,
    ) -> None:
        message = settings_with(monkeypatch, env=env, database_url="", secret_key="x" * 40)

        assert message.startswith("ATRIUM_DATABASE_URL is required")


# --- server URLs: Redis, the broker, the payment gateway ----------------------------------------


class TestServerUrl:
    @pytest.mark.parametrize(("url", "schemes"), [
        ("redis://cache:6379/0", ("redis", "rediss", "unix")),
        (f"rediss://:{SECRET}@cache:6380/1", ("redis", "rediss", "unix")),
        ("redis://cache", ("redis", "rediss", "unix")),
        ("unix:///run/redis/redis.sock?db=2", ("redis", "rediss", "unix")),
        ("amqp://guest:guest@mq:5672/%2F", ("amqp", "amqps")),
        ("https://gateway.example.com/v1", ("https", "http")),
    ])
    def test_good_urls_are_accepted(self, url: str, schemes: tuple[str, ...]) -> None:
        check_server_url("ATRIUM_X_URL", url, schemes)

    @pytest.mark.parametrize(("url", "says"), [
        ("garbage", "ATRIUM_X_URL is not a URL; expected redis://host:6379/0 or rediss://host:6380/0 or "
                    "unix:///run/redis.sock"),
        (f"http://u:{SECRET}@cache:6379/0", "ATRIUM_X_URL: http:// does not work; expected redis://"),
        (f"redis://u:{SECRET}@:6379/0", "ATRIUM_X_URL: no host"),
        (f"redis://u:{SECRET}@cache:0/0", "ATRIUM_X_URL: the port is not a number from 1 to 65535"),
        (f"redis://u:{SECRET}@cache:65536/0", "ATRIUM_X_URL: the port is not a number from 1 to 65535"),
        (f"redis://u:{SECRET}@cache:port/0", "ATRIUM_X_URL: the port is not a number from 1 to 65535"),
        (f"redis://u:{SECRET}@cache:6379/cache", "the Redis database /cache is not a number (e.g. /0)"),
        ("unix://", "ATRIUM_X_URL: no socket path"),
    ])
    def test_bad_redis_urls_are_refused(self, url: str, says: str) -> None:
        assert says in refused(check_server_url, "ATRIUM_X_URL", url, ("redis", "rediss", "unix"))

    def test_the_broker_url_must_suit_the_broker(self, monkeypatch: pytest.MonkeyPatch) -> None:
        message = settings_with(monkeypatch, broker_backend="rabbitmq", broker_url=f"redis://:{SECRET}@q:6379/0")

        assert message == ("ATRIUM_BROKER_URL: redis:// does not work with ATRIUM_BROKER_BACKEND=rabbitmq; "
                           "expected amqp://user:password@host:5672/ or amqps://user:password@host:5671/")

    def test_a_garbled_broker_url_is_refused_even_for_the_stub(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert settings_with(monkeypatch, broker_url="garbage").startswith("ATRIUM_BROKER_URL is not a URL")

    def test_the_payment_gateway_is_http(self, monkeypatch: pytest.MonkeyPatch) -> None:
        message = settings_with(monkeypatch, payments_url="ftp://gateway.example.com")

        assert message.startswith("ATRIUM_PAYMENTS_URL: ftp:// does not work; expected https://host")


# --- a backend that needs a server needs its URL, in every profile -------------------------------


@pytest.mark.parametrize("env", ["development", "test"])
@pytest.mark.parametrize(("variables", "says"), [
    ({"cache_backend": "redis"}, f"ATRIUM_REDIS_URL is required with ATRIUM_CACHE_BACKEND=redis {EXAMPLE}"),
    ({"rate_limit_backend": "redis"},
     f"ATRIUM_REDIS_URL is required with ATRIUM_RATE_LIMIT_BACKEND=redis {EXAMPLE}"),
    ({"email_backend": "smtp"}, "ATRIUM_SMTP_HOST is required with ATRIUM_EMAIL_BACKEND=smtp"),
    ({"payments_backend": "http"}, "ATRIUM_PAYMENTS_URL is required with ATRIUM_PAYMENTS_BACKEND=http"),
    ({"payments_backend": "http", "payments_url": "https://gateway.example"},
     "ATRIUM_PAYMENTS_API_KEY is required with ATRIUM_PAYMENTS_BACKEND=http"),
    ({"broker_backend": "redis"}, "ATRIUM_BROKER_URL is required with ATRIUM_BROKER_BACKEND=redis "
                                  "(e.g. redis://host:6379/0)"),
    ({"broker_backend": "rabbitmq"}, "ATRIUM_BROKER_URL is required with ATRIUM_BROKER_BACKEND=rabbitmq "
                                     "(e.g. amqp://user:password@host:5672/)"),
])
def test_a_backend_without_its_url_is_refused_in_every_profile(
    monkeypatch: pytest.MonkeyPatch, env: str, variables: dict[str, str], says: str,
) -> None:
    assert settings_with(monkeypatch, env=env, **variables) == says


def test_payments_over_http_are_only_needed_with_billing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_PAYMENTS_BACKEND", "http")
    monkeypatch.setenv("ATRIUM_MODULES", "users,items")

    assert load_settings().payments_backend == "http"


@pytest.mark.parametrize(("variables", "says"), [
    ({"secret_key": ""}, "ATRIUM_SECRET_KEY is empty; set it, or unset the variable for the development "
                         "profile's own"),
    ({"modules": ""}, "ATRIUM_MODULES is empty; name the modules to run (e.g. users,items,billing)"),
    ({"modules": " , "}, "ATRIUM_MODULES is empty; name the modules to run (e.g. users,items,billing)"),
])
def test_an_empty_secret_or_module_list_is_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], says: str,
) -> None:
    assert settings_with(monkeypatch, **variables) == says


def test_backends_with_their_urls_load(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"CACHE_BACKEND": "redis", "RATE_LIMIT_BACKEND": "redis", "REDIS_URL": "redis://c:6379/0",
                        "BROKER_BACKEND": "rabbitmq", "BROKER_URL": "amqp://guest:guest@mq:5672/"}.items():
        monkeypatch.setenv(f"ATRIUM_{name}", value)

    settings = load_settings()

    assert (settings.cache_backend, settings.broker_backend) == ("redis", "rabbitmq")


# --- levels, ports, timeouts, paths ---------------------------------------------------------------


@pytest.mark.parametrize("given", ["debug", " Warning ", "TRACE", "success"])
def test_log_levels_are_loguru_names_in_any_case(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.setenv("ATRIUM_LOG_LEVEL", given)

    level = load_settings().log_level

    assert level == given.strip().upper()
    assert level in LOG_LEVELS


def test_an_unknown_log_level_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_with(monkeypatch, log_level="verbose") == (
        "ATRIUM_LOG_LEVEL='verbose' is not a level; use one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, "
        "CRITICAL"
    )


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("port", "0", "ATRIUM_PORT: Input should be greater than or equal to 1"),
    ("port", "65536", "ATRIUM_PORT: Input should be less than or equal to 65535"),
    ("smtp_port", "70000", "ATRIUM_SMTP_PORT: Input should be less than or equal to 65535"),
    ("host", "", "ATRIUM_HOST: String should have at least 1 character"),
    ("database_statement_timeout", "0", "ATRIUM_DATABASE_STATEMENT_TIMEOUT: Input should be greater than 0"),
    ("database_statement_timeout", "soon",
     "ATRIUM_DATABASE_STATEMENT_TIMEOUT: Input should be a valid number"),
    ("database_connect_timeout", "0", "ATRIUM_DATABASE_CONNECT_TIMEOUT: Input should be greater than 0"),
    ("smtp_timeout", "-1", "ATRIUM_SMTP_TIMEOUT: Input should be greater than 0"),
    ("database_pool_recycle", "-2",
     "ATRIUM_DATABASE_POOL_RECYCLE: Input should be greater than or equal to -1"),
    ("root_path", "/atrium/", "ATRIUM_ROOT_PATH='/atrium/' must start with / and not end with one"),
    ("root_path", "atrium", "ATRIUM_ROOT_PATH='atrium' must start with / and not end with one"),
    *[("email_message_id_domain", bad, f"ATRIUM_EMAIL_MESSAGE_ID_DOMAIN={bad!r} is not a domain name")
      for bad in ("no-reply@atrium.example", "atrium example", "<atrium.example>", "-atrium.example",
                  "atrium..example", "a" * 64 + ".example")],
])
def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                         says: str) -> None:
    assert settings_with(monkeypatch, **{variable: value}).startswith(says)


def test_the_backoff_bounds_must_be_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    message = settings_with(monkeypatch, job_min_backoff_ms="5000", job_max_backoff_ms="100")

    assert message == "ATRIUM_JOB_MIN_BACKOFF_MS is larger than ATRIUM_JOB_MAX_BACKOFF_MS"


def test_the_statement_timeout_defaults_to_ten_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_DATABASE_STATEMENT_TIMEOUT", "2.5")

    assert load_settings().database_statement_timeout == 2.5
    monkeypatch.delenv("ATRIUM_DATABASE_STATEMENT_TIMEOUT")
    assert load_settings().database_statement_timeout == 10.0


# --- the .env file ----------------------------------------------------------------------------------


def test_a_dotenv_line_that_is_not_a_setting_is_refused_by_number(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# comment\n\nATRIUM_PORT=8001\nATRIUM_LOG_LEVEL = 'info'\n"
                                   "not a setting\n")

    assert refused(load_settings) == ".env line 5: not NAME=value (a comment starts with #)"


def test_a_clean_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# comment\nexport ATRIUM_PORT=8001\nATRIUM_LOG_LEVEL='debug'\nOTHER=1\n")

    settings = load_settings()

    assert (settings.port, settings.log_level) == (8001, "DEBUG")


def test_a_quoted_dotenv_value_may_span_lines_and_the_line_after_it_is_checked(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text('BANNER="two\nlines with a \\" quote"\nBARE\nATRIUM_PORT=8002\n')
    assert load_settings().port == 8002

    (tmp_path / ".env").write_text('BANNER="two\nlines"\nnot a setting\n')
    assert refused(load_settings) == ".env line 3: not NAME=value (a comment starts with #)"


def test_a_dotenv_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"ATRIUM_PORT=8001\n\xff\xfe")

    assert refused(load_settings) == ".env is not UTF-8 text"


def test_a_bad_value_in_the_dotenv_file_names_its_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"ATRIUM_DATABASE_URL=postgresql://atrium:{SECRET}@db/atrium\n")

    assert refused(load_settings).startswith("ATRIUM_DATABASE_URL: postgresql:// names no driver")


def test_python_dotenv_disabled_leaves_the_dotenv_file_unread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The tests set it, so a developer's .env (ATRIUM_MODULES from the README's walkthrough) never
    reaches them; even a .env that would be refused is not read."""
    (tmp_path / ".env").write_text("ATRIUM_PORT=8001\nnot a setting\n")
    monkeypatch.setenv("PYTHON_DOTENV_DISABLED", "1")

    assert load_settings().port == 8000

    monkeypatch.delenv("PYTHON_DOTENV_DISABLED")
    assert refused(load_settings) == ".env line 2: not NAME=value (a comment starts with #)"
