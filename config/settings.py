"""One ``Settings`` object, three profiles.

``ATRIUM_ENV`` picks a profile (development, test, production) whose values fill every field
the environment left unset; any field can still be set with ``ATRIUM_<FIELD>``. Production
refuses to start when a secret is left at its development default or a server URL is missing,
so a misconfigured deploy fails loudly at boot instead of quietly running on SQLite.

Every profile refuses a value that can't work (a URL of the wrong scheme or driver, a backend
without its server's URL, a port out of range, an unknown log level, an unreadable ``.env`` line)
with a ``ConfigError`` of one line naming the variable, raised before anything is opened; the CLI
prints it and exits with status 2.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.ratelimit.limiter import parse_policy


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigError(ValueError):
    """A setting that makes the service unsafe or impossible to start; the message is one line."""


DEV_SECRET = "dev-secret-change-me-dev-secret-change-me"
DEV_WEBHOOK_SECRET = "dev-webhook-secret-change-me"

# Rate limit groups every deploy has: the general limit per client or user, and the stricter
# limits of POST /auth/token per client and per account.
DEFAULT_RATE_LIMITS: dict[str, str] = {
    "default": "600/minute", "auth_client": "30/minute", "auth_account": "5/minute"
}

# Values a profile gives to fields the environment did not set. Production gives none of the
# server URLs: they must come from the deploy.
PROFILES: dict[Environment, dict[str, Any]] = {
    Environment.DEVELOPMENT: {
        "database_url": "sqlite+aiosqlite:///./var/atrium.db",
        "cache_backend": "memory",
        "broker_backend": "stub",
        "email_backend": "console",
        "auto_migrate": True,
        "run_worker_in_process": True,
        "log_json": False,
        "secret_key": DEV_SECRET,
        "payments_backend": "fake",
        "payments_webhook_secret": DEV_WEBHOOK_SECRET,
    },
    Environment.TEST: {
        "database_url": "sqlite+aiosqlite:///./var/atrium-test.db",
        "cache_backend": "memory",
        "broker_backend": "stub",
        "email_backend": "memory",
        "auto_migrate": True,
        "run_worker_in_process": True,
        "log_json": False,
        "log_level": "WARNING",
        "secret_key": DEV_SECRET,
        "password_time_cost": 1,
        "password_memory_cost": 1024,
        "payments_backend": "fake",
        "payments_webhook_secret": DEV_WEBHOOK_SECRET,
    },
    Environment.PRODUCTION: {
        "cache_backend": "redis",
        "broker_backend": "redis",
        "email_backend": "smtp",
        "payments_backend": "http",
        "rate_limit_backend": "redis",
        "auto_migrate": False,
        "log_json": True,
    },
}


# --- what a URL setting must look like ---------------------------------------------------------
# A bad value is refused here, as one line naming the variable, before anything is opened: left to
# the driver it surfaced as a long traceback (a `postgresql://` URL ended in "No module named
# 'psycopg'"). Messages quote a URL's scheme, host and port, never the rest (it may hold a password).

# A DNS name as a Message-ID's right-hand side may be (RFC 5322 dot-atom of hostname labels).
MESSAGE_ID_DOMAIN = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                               r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

POSTGRES_EXAMPLE = "postgresql+asyncpg://user:password@host:5432/atrium"
SQLITE_EXAMPLE = "sqlite+aiosqlite:///./var/atrium.db"
# The database drivers Atrium runs on: both asynchronous.
DATABASE_DRIVERS = {"postgresql+asyncpg": POSTGRES_EXAMPLE, "sqlite+aiosqlite": SQLITE_EXAMPLE}
# Options of the URL's query string that are not asyncpg.connect() parameters but SQLAlchemy's own.
_SQLALCHEMY_PG_OPTIONS = {"prepared_statement_cache_size", "prepared_statement_name_func"}
# What people bring from libpq/psycopg, and asyncpg's name for it.
_LIBPQ_OPTIONS = {"sslmode": "ssl", "connect_timeout": "timeout (or ATRIUM_DATABASE_CONNECT_TIMEOUT)",
                  "dbname": "the path (/name)", "options": "server_settings (not in a URL)"}
REDIS_SCHEMES = ("redis", "rediss", "unix")
BROKER_SCHEMES: dict[str, tuple[str, ...]] = {"redis": REDIS_SCHEMES, "rabbitmq": ("amqp", "amqps")}
URL_EXAMPLES = {"redis": "redis://host:6379/0", "rediss": "rediss://host:6380/0",
                "unix": "unix:///run/redis.sock", "amqp": "amqp://user:password@host:5672/",
                "amqps": "amqps://user:password@host:5671/", "http": "http://host:8080",
                "https": "https://host"}
# loguru's levels (core.observability.logging), the names ATRIUM_LOG_LEVEL accepts (any case).
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def check_database_url(variable: str, url: str, *, postgres_only: bool = False) -> None:
    """Raise a one-line ``ConfigError`` unless ``url`` names a driver Atrium runs on, with a usable
    port and only options asyncpg knows."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    drivers = {"postgresql+asyncpg": POSTGRES_EXAMPLE} if postgres_only else DATABASE_DRIVERS
    expected = " or ".join(drivers.values())
    try:
        parsed = make_url(url.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"{variable} is not a database URL (or its port is not a number); "
                          f"expected {expected}") from None
    if parsed.drivername not in drivers:
        backend, _, driver = parsed.drivername.partition("+")
        if backend in ("postgresql", "postgres"):
            fix = "postgresql+asyncpg://"
        elif backend == "sqlite" and not postgres_only:
            fix = "sqlite+aiosqlite:///"
        else:
            raise ConfigError(f"{variable}: {parsed.drivername}:// is not supported; expected {expected}")
        what = f"the driver {driver!r} is not supported" if driver else "names no driver"
        raise ConfigError(f"{variable}: {parsed.drivername}:// {what}; use {fix} (Atrium's drivers "
                          "are asynchronous)")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigError(f"{variable}: port {parsed.port} is out of range (1-65535)")
    if parsed.drivername == "postgresql+asyncpg" and parsed.query:
        _check_asyncpg_options(variable, dict(parsed.query))


# The values asyncpg takes for ?ssl= in a URL (libpq's sslmode names).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_asyncpg_options(variable: str, options: dict[str, Any]) -> None:
    """The URL's query goes to ``asyncpg.connect()`` as keywords: an unknown one fails every connect."""
    import inspect

    import asyncpg

    known = set(inspect.signature(asyncpg.connect).parameters) | _SQLALCHEMY_PG_OPTIONS
    for name in sorted(set(options) - known):
        hint = f"; asyncpg calls it {_LIBPQ_OPTIONS[name]}" if name in _LIBPQ_OPTIONS else ""
        raise ConfigError(f"{variable}: ?{name}= is not an asyncpg connection option{hint}")
    if "ssl" in options and options["ssl"] not in SSL_MODES:
        raise ConfigError(f"{variable}: ?ssl= must be one of {', '.join(SSL_MODES)}")


def check_server_url(variable: str, url: str, schemes: Sequence[str], *, why: str = "") -> None:
    """Raise a one-line ``ConfigError`` unless ``url`` has one of ``schemes``, a host (unix: a
    path) and a port in range; ``why`` says which setting asks for those schemes."""
    examples = " or ".join(URL_EXAMPLES.get(s, f"{s}://host") for s in schemes)
    parts = urlsplit(url.strip())
    if not parts.scheme:
        raise ConfigError(f"{variable} is not a URL; expected {examples}")
    if parts.scheme not in schemes:
        because = f" with {why}" if why else ""
        raise ConfigError(f"{variable}: {parts.scheme}:// does not work{because}; expected {examples}")
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = 0
    if port == 0:
        raise ConfigError(f"{variable}: the port is not a number from 1 to 65535")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{variable}: no socket path; expected {examples}")
        return
    if not parts.hostname:
        raise ConfigError(f"{variable}: no host; expected {examples}")
    database = parts.path.strip("/")
    if parts.scheme in REDIS_SCHEMES and database and not database.isdigit():
        raise ConfigError(f"{variable}: the Redis database /{database} is not a number (e.g. /0)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATRIUM_", env_file=".env", extra="ignore", frozen=True, validate_default=True
    )

    env: Environment = Environment.DEVELOPMENT
    modules: Annotated[tuple[str, ...], NoDecode] = ("users", "items", "billing")
    # What this process serves out of ``modules`` (README "Modules per process"); empty = all.
    # The rest stay loaded for their facades, providers and outbox routing.
    api_modules: Annotated[tuple[str, ...], NoDecode] = ()  # routers included by the app
    worker_modules: Annotated[tuple[str, ...], NoDecode] = ()  # actors a worker consumes

    # The fast path (core/fastpath/README.md): auto = on where the installed library versions are the
    # verified ones, on = always (trying a new release), off = stock FastAPI, SQLAlchemy and redis-py.
    fast_path: Literal["auto", "on", "off"] = "auto"
    # Pieces of the fast path left off while it is on (handler, transactions, pool,
    # redis): for measuring each piece alone (bench/run.py --pieces).
    fast_path_skip: Annotated[tuple[str, ...], NoDecode] = ()

    # HTTP
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    root_path: str = ""  # behind a proxy that serves the API under a prefix: "/atrium"
    # The largest request body accepted (core/edge/body_limit.py); a longer one is 413 payload_too_large.
    max_body_bytes: int = Field(1_048_576, ge=1)

    # Database
    database_url: str = ""
    # Connections kept open per process. Overflow connections are closed as soon as they are
    # returned, so under sustained load beyond the pool each request would open one (bench/README.md):
    # the pool is sized for the steady state (as asyncpg's own pool, 20) and overflow is opt-in.
    database_pool_size: int = Field(20, ge=1)
    database_max_overflow: int = Field(0, ge=0)
    database_pool_timeout: float = Field(5.0, gt=0)
    database_pool_recycle: int = Field(1800, ge=-1)  # seconds; -1 = never
    database_pool_pre_ping: bool = True
    # With pre-ping on, a pooled connection's socket is checked on every checkout; one idle this many
    # seconds or more is also pinged with a round trip (core.fastpath.pool.Pinger). 0 = ping every checkout.
    database_pool_ping_after: float = Field(1.0, ge=0)
    # PostgreSQL: seconds to open a connection (TCP, TLS, start-up and authentication), for the
    # pool and for the check `atrium migrate`, `create-admin` and `worker` make before they start.
    database_connect_timeout: float = Field(5.0, gt=0)
    # Seconds one statement may run. PostgreSQL cancels it at this limit (the connection stays
    # usable); a server that answers nothing at all (hung, paused, network lost) is given up by the
    # client core.db.engine.STATEMENT_GRACE seconds later, and that connection dropped: a request on
    # a database that stopped answering gets its 503 (README "When the database stops answering").
    # SQLite: how long a statement waits for another connection's write lock.
    database_statement_timeout: float = Field(10.0, gt=0)
    database_echo: bool = False
    # Read replicas (README "Read replicas"): comma-separated URLs of hot standbys of database_url.
    # Read-only use cases go to them round-robin; empty = everything on the primary. A replica
    # that can't be reached is skipped for database_replica_cooloff seconds (its reads go to the primary).
    database_replica_urls: Annotated[tuple[str, ...], NoDecode] = ()
    database_replica_cooloff: float = Field(5.0, gt=0)
    auto_migrate: bool = False

    # Cache
    cache_backend: Literal["memory", "redis", "none"] = "memory"
    redis_url: str = ""
    cache_namespace: str = "atrium"
    items_cache_ttl: float = Field(300.0, gt=0)

    # Queue
    broker_backend: Literal["stub", "redis", "rabbitmq"] = "stub"
    broker_url: str = ""
    broker_namespace: str = "atrium"
    worker_threads: int = Field(4, ge=1)
    job_max_retries: int = Field(5, ge=0)
    job_min_backoff_ms: int = Field(500, ge=0)
    job_max_backoff_ms: int = Field(60_000, ge=0)
    job_time_limit_ms: int = Field(60_000, ge=1)
    # Redis broker: how long a silent worker keeps its unacknowledged messages before another
    # worker requeues them (a worker killed mid-job), and how often (per million commands) a
    # worker runs that check. A live worker speaks at least once a second (an idle fetch), so 10 s
    # never mistakes it for dead; running the check on every fetch gives a dead worker's messages
    # back within about 11 s (docs/redelivery.md). dramatiq's own defaults (60 s, 1,000) take minutes.
    broker_heartbeat_timeout_ms: int = Field(10_000, ge=1000, le=600_000)
    broker_maintenance_chance: int = Field(1_000_000, ge=1, le=1_000_000)
    run_worker_in_process: bool = False  # development: jobs run inside the API process
    relay_outbox_in_api: bool = True  # the API wakes the relay right after each commit
    outbox_poll_interval: float = Field(1.0, gt=0)
    outbox_batch_size: int = Field(100, ge=1)
    # The publication registry (docs/redelivery.md): each worker sends again a message whose job has
    # not completed this long after it was sent, at most this many times (0: never; failed ones are
    # left to `atrium outbox resubmit`), looking every interval; completed rows are kept this long.
    outbox_resubmit_after_seconds: float = Field(600.0, gt=0)
    outbox_resubmit_limit: int = Field(3, ge=0)
    outbox_resubmit_interval_seconds: float = Field(60.0, gt=0)
    outbox_publication_retention_days: float = Field(7.0, gt=0)

    # Email
    email_backend: Literal["console", "memory", "smtp"] = "console"
    email_from: str = "Atrium <no-reply@atrium.local>"
    smtp_host: str = ""
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = Field(10.0, gt=0)
    # The right-hand side of every mail's Message-ID (<...@domain>); empty: the domain of email_from.
    email_message_id_domain: str = ""

    # Payments (the billing module's gateway)
    payments_backend: Literal["fake", "http"] = "fake"
    payments_url: str = ""
    payments_api_key: str = ""
    payments_webhook_secret: str = ""
    payments_timeout: float = Field(10.0, gt=0)
    payments_connect_timeout: float = Field(2.0, gt=0)
    payments_max_attempts: int = Field(3, ge=1, le=10)
    # The payment reconciler (each worker): a payment pending this long without a change is asked
    # about at the gateway and finished; how often a worker looks for such payments.
    billing_reconcile_after_seconds: float = Field(60.0, gt=0)
    billing_reconcile_interval_seconds: float = Field(10.0, gt=0)

    # Idempotency keys: how long a completed key replays its response, how long an in-flight
    # claim may run before another request may take the key over, and how long a duplicate waits.
    idempotency_ttl_seconds: int = Field(86_400, ge=60)
    idempotency_lease_seconds: float = Field(60.0, gt=0)
    idempotency_wait_seconds: float = Field(5.0, ge=0)
    idempotency_purge_interval: float = Field(3600.0, gt=0)

    # Security
    secret_key: str = ""
    # README "Sessions": a short-lived access token (JWT) and a rotating refresh token per session.
    access_token_ttl_seconds: int = Field(900, ge=60)
    # A session ends this long after its last refresh (each refresh moves the end), or when revoked.
    refresh_token_ttl_seconds: int = Field(30 * 86_400, ge=300)
    # A session that ended (expired or revoked) this long ago is deleted by the workers' purge, run
    # every users_session_purge_interval_seconds (users.purge_sessions).
    users_session_retention_days: float = Field(7.0, ge=0)
    users_session_purge_interval_seconds: float = Field(3600.0, gt=0)
    # How long an API process may reuse what it read of a session and its account (logout, a
    # disabled account, a revoked admin role reach every process within this); 0 = read every time.
    auth_cache_seconds: float = Field(0.5, ge=0, le=1.0)
    token_issuer: str = "atrium"
    password_time_cost: int = Field(3, ge=1)
    password_memory_cost: int = Field(65536, ge=8)

    # Rate limits (README "Rate limits"): group -> "N/second|minute|hour|day"; the groups given
    # replace the defaults of the same name. Path prefix -> group ("none" exempts a prefix).
    rate_limit_backend: Literal["memory", "redis", "none"] = "memory"
    rate_limits: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    rate_limit_groups: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    rate_limit_fail_open: bool = True  # general limits when the limiter is down: let requests through
    rate_limit_login_fail_open: bool = False  # POST /auth/token when it is down: 503
    rate_limit_timeout: float = Field(1.0, gt=0)  # Redis limiter: connect, command and pool wait (s)
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()  # IPs/CIDRs whose X-Forwarded-For counts

    health_timeout: float = Field(2.0, gt=0)

    # Metrics (README "Metrics"). `atrium serve --workers N>1` shares them through this directory,
    # emptied of the previous run's files at start; empty = <tempdir>/atrium-metrics-<uid>-<port>.
    metrics_multiproc_dir: str = ""
    # `atrium worker` serves its own /metrics here; port 0 = off.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9191, ge=0, le=65535)

    # Logging
    log_level: str = "INFO"
    log_json: bool = False

    # Tracing (README "Tracing", core/observability/tracing.py): OpenTelemetry spans sent over OTLP/HTTP
    # to <endpoint>/v1/traces (e.g. http://collector:4318); empty = off, and nothing of the
    # OpenTelemetry SDK is even imported.
    otel_exporter_otlp_endpoint: str = ""
    # The share of new traces recorded (parent-based: a request or job continues its caller's choice).
    otel_sampling_ratio: float = Field(1.0, ge=0.0, le=1.0)
    # service.name of the spans; empty = atrium-api for `serve`, atrium-worker for `worker`.
    otel_service_name: str = ""

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        raw_env = data.get("env") or Environment.DEVELOPMENT
        try:
            env = Environment(raw_env)
        except ValueError:
            raise ConfigError(
                f"ATRIUM_ENV={raw_env!r} is not one of {', '.join(e.value for e in Environment)}"
            ) from None
        return {**PROFILES[env], **{k: v for k, v in data.items() if v is not None}}

    @field_validator("modules", "api_modules", "worker_modules", "fast_path_skip", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @model_validator(mode="after")
    def _check_process_modules(self) -> Settings:
        for setting, names in (("API_MODULES", self.api_modules), ("WORKER_MODULES", self.worker_modules)):
            for name in names:
                if name not in self.modules:
                    raise ConfigError(f"ATRIUM_{setting}: module {name!r} is not enabled "
                                      f"(ATRIUM_MODULES={','.join(self.modules)})")
        return self

    @field_validator("fast_path_skip", mode="after")
    @classmethod
    def _check_fast_path_skip(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = ("handler", "transactions", "pool", "redis")  # core.fastpath.PIECES
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ConfigError(f"ATRIUM_FAST_PATH_SKIP: unknown piece(s) {', '.join(unknown)}; "
                              f"the pieces are {', '.join(known)}")
        return value

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _split_replica_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(url.strip() for url in value.split(",") if url.strip())
        return value

    @model_validator(mode="after")
    def _check_replicas(self) -> Settings:
        if self.database_replica_urls and (self.is_sqlite or not self.database_url):
            raise ConfigError("ATRIUM_DATABASE_REPLICA_URLS needs a PostgreSQL ATRIUM_DATABASE_URL")
        for url in self.database_replica_urls:
            check_database_url("ATRIUM_DATABASE_REPLICA_URLS", url, postgres_only=True)
        return self

    @field_validator("rate_limits", "rate_limit_groups", mode="before")
    @classmethod
    def _parse_mapping(cls, value: Any, info: ValidationInfo) -> Any:
        """From the environment: a JSON object, or ``name=value,name=value``."""
        if not isinstance(value, str):
            return value
        variable = f"ATRIUM_{(info.field_name or '').upper()}"
        if value.lstrip().startswith("{"):
            try:
                return json.loads(value)
            except ValueError:
                raise ConfigError(f"{variable} is not a valid JSON object") from None
        pairs = [pair.partition("=") for pair in value.split(",") if pair.strip()]
        if any(not sep or not key.strip() for key, sep, _ in pairs):
            raise ConfigError(f"{variable} must be a JSON object or name=value pairs separated by commas")
        return {key.strip(): item.strip() for key, _, item in pairs}

    @field_validator("rate_limits", mode="after")
    @classmethod
    def _check_rate_limits(cls, value: dict[str, str]) -> dict[str, str]:
        merged = {**DEFAULT_RATE_LIMITS, **value}
        for name, spec in merged.items():
            try:
                parse_policy(name, spec)
            except ValueError as exc:
                raise ConfigError(f"ATRIUM_RATE_LIMITS: {exc}") from None
        return merged

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _check_trusted_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        for proxy in value:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"ATRIUM_TRUSTED_PROXIES: {proxy!r} is not an IP address or network"
                ) from None
        return value

    @model_validator(mode="after")
    def _check_rate_limit_groups(self) -> Settings:
        for prefix, group in self.rate_limit_groups.items():
            if not prefix.startswith("/"):
                raise ConfigError(f"ATRIUM_RATE_LIMIT_GROUPS: the path prefix {prefix!r} must start with /")
            if group != "none" and group not in self.rate_limits:
                raise ConfigError(
                    f"ATRIUM_RATE_LIMIT_GROUPS: {prefix} -> {group!r}, "
                    "a group ATRIUM_RATE_LIMITS does not define"
                )
        return self

    # --- values no profile may get wrong (README "Configuration errors") -------------------------

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().upper() not in LOG_LEVELS:
            raise ConfigError(f"ATRIUM_LOG_LEVEL={value!r} is not a level; "
                              f"use one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    @field_validator("root_path")
    @classmethod
    def _check_root_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ConfigError(f"ATRIUM_ROOT_PATH={value!r} must start with / and not end with one "
                              "(e.g. /atrium)")
        return value

    @field_validator("email_message_id_domain")
    @classmethod
    def _check_message_id_domain(cls, value: str) -> str:
        if value and not MESSAGE_ID_DOMAIN.fullmatch(value):
            raise ConfigError(f"ATRIUM_EMAIL_MESSAGE_ID_DOMAIN={value!r} is not a domain name "
                              "(e.g. mail.example.com)")
        return value.lower()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value:
            check_database_url("ATRIUM_DATABASE_URL", value)
        return value

    @field_validator("payments_url")
    @classmethod
    def _check_payments_url(cls, value: str) -> str:
        if value:
            check_server_url("ATRIUM_PAYMENTS_URL", value, ("https", "http"))
        return value

    @field_validator("otel_exporter_otlp_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str) -> str:
        if value:
            check_server_url("ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT", value, ("http", "https"),
                             why="the OTLP/HTTP exporter")
        return value.strip()

    @model_validator(mode="after")
    def _check_servers(self) -> Settings:
        """Every backend that talks to a server has that server's URL, of the right kind."""
        if not self.database_url:
            where = " in production" if self.env is Environment.PRODUCTION else ""
            raise ConfigError(f"ATRIUM_DATABASE_URL is required{where} (e.g. {POSTGRES_EXAMPLE})")
        if self.redis_url:
            check_server_url("ATRIUM_REDIS_URL", self.redis_url, REDIS_SCHEMES)
        for setting, backend in (("CACHE_BACKEND", self.cache_backend),
                                 ("RATE_LIMIT_BACKEND", self.rate_limit_backend)):
            if backend == "redis" and not self.redis_url:
                raise ConfigError(f"ATRIUM_REDIS_URL is required with ATRIUM_{setting}=redis "
                                  f"(e.g. {URL_EXAMPLES['redis']})")
        if self.broker_backend != "stub":
            schemes = BROKER_SCHEMES[self.broker_backend]
            if not self.broker_url:
                raise ConfigError(f"ATRIUM_BROKER_URL is required with ATRIUM_BROKER_BACKEND="
                                  f"{self.broker_backend} (e.g. {URL_EXAMPLES[schemes[0]]})")
            check_server_url("ATRIUM_BROKER_URL", self.broker_url, schemes,
                             why=f"ATRIUM_BROKER_BACKEND={self.broker_backend}")
        elif self.broker_url:  # unused by the stub broker, but a garbled value is still a mistake
            check_server_url("ATRIUM_BROKER_URL", self.broker_url, (*REDIS_SCHEMES, "amqp", "amqps"))
        if self.email_backend == "smtp" and not self.smtp_host:
            raise ConfigError("ATRIUM_SMTP_HOST is required with ATRIUM_EMAIL_BACKEND=smtp")
        if self.payments_backend == "http" and "billing" in self.modules:
            for setting, value in (("URL", self.payments_url), ("API_KEY", self.payments_api_key)):
                if not value:
                    raise ConfigError(f"ATRIUM_PAYMENTS_{setting} is required with "
                                      "ATRIUM_PAYMENTS_BACKEND=http")
        return self

    @model_validator(mode="after")
    def _check_basics(self) -> Settings:
        if not self.modules:
            raise ConfigError("ATRIUM_MODULES is empty; name the modules to run (e.g. users,items,billing)")
        if not self.secret_key and self.env is not Environment.PRODUCTION:  # production: below
            raise ConfigError("ATRIUM_SECRET_KEY is empty; set it, or unset the variable for the "
                              f"{self.env.value} profile's own")
        if self.job_min_backoff_ms > self.job_max_backoff_ms:
            raise ConfigError("ATRIUM_JOB_MIN_BACKOFF_MS is larger than ATRIUM_JOB_MAX_BACKOFF_MS")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env is not Environment.PRODUCTION:
            return self
        if not self.secret_key or self.secret_key == DEV_SECRET:
            raise ConfigError("ATRIUM_SECRET_KEY is unset or left at its development default")
        if len(self.secret_key) < 32:
            raise ConfigError("ATRIUM_SECRET_KEY must be at least 32 characters in production")
        # A missing database, Redis or broker URL is refused in every profile (_check_servers).
        if self.database_url.startswith("sqlite"):
            raise ConfigError("ATRIUM_DATABASE_URL must point at PostgreSQL in production, not SQLite")
        if self.broker_backend == "stub":
            raise ConfigError("ATRIUM_BROKER_BACKEND=stub keeps jobs in memory; use redis or rabbitmq")
        if self.email_backend == "smtp" and not self.smtp_host:
            raise ConfigError("ATRIUM_SMTP_HOST is required in production (email_backend=smtp)")
        if "billing" in self.modules:
            self._refuse_unsafe_payments()
        return self

    def _refuse_unsafe_payments(self) -> None:
        if self.payments_backend == "fake":
            raise ConfigError("ATRIUM_PAYMENTS_BACKEND=fake charges nobody; use http in production")
        if not self.payments_url or not self.payments_api_key:
            raise ConfigError("ATRIUM_PAYMENTS_URL and ATRIUM_PAYMENTS_API_KEY are required in production")
        if len(self.payments_webhook_secret) < 16 or self.payments_webhook_secret == DEV_WEBHOOK_SECRET:
            raise ConfigError("ATRIUM_PAYMENTS_WEBHOOK_SECRET must be set (16+ characters) in production")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with ``overrides`` taking precedence.

    A ``ConfigError`` inside pydantic's ValidationError is unwrapped so callers show one line; so
    is a ``.env`` file in the working directory that can't be read as ``NAME=value`` lines.
    """
    from pydantic import ValidationError

    if _dotenv_disabled():
        # python-dotenv's own switch, honoured for the whole file: the tests set it, so a
        # developer's .env (a module added by the README's walkthrough) never reaches them.
        overrides.setdefault("_env_file", None)
    else:
        _check_dotenv(Path(".env"))
    try:
        return Settings(**overrides)
    except UnicodeDecodeError:
        raise ConfigError(".env is not UTF-8 text") from None
    except ValidationError as exc:
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, ConfigError):
                raise cause from None
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


# A .env line: blank, a comment, ``[export ]NAME=value`` or a bare ``NAME`` (python-dotenv's grammar).
_DOTENV_BINDING = re.compile(r"\s*(?:export\s+)?[A-Za-z_][A-Za-z0-9_.-]*\s*(?:=(?P<value>.*))?$")


def _dotenv_disabled() -> bool:
    import os

    return os.environ.get("PYTHON_DOTENV_DISABLED", "").lower() in {"1", "true", "yes"}


def _check_dotenv(path: Path) -> None:
    """A ``.env`` line python-dotenv can't parse would be skipped with a warning, and the setting
    it meant silently left at its default: refused instead, naming the line. A quoted value may
    span lines, as python-dotenv allows."""
    if not path.is_file():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path} can't be read ({exc.strerror or type(exc).__name__})") from None
    quote = ""  # the quote of a value still open from an earlier line
    for number, line in enumerate(text.splitlines(), start=1):
        if quote:
            quote = "" if _closes(line, quote) else quote
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_BINDING.match(line)
        if match is None:
            raise ConfigError(f"{path} line {number}: not NAME=value (a comment starts with #)")
        value = (match.group("value") or "").lstrip()
        if value[:1] in ("'", '"') and not _closes(value[1:], value[0]):
            quote = value[0]


def _closes(text: str, quote: str) -> bool:
    """Whether ``text`` holds an unescaped ``quote``."""
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == quote:
            return True
    return False


def _describe(error: Any) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "settings"
    return f"ATRIUM_{field.upper()}: {error['msg']}"
