"""One ``Settings`` object, three profiles.

``ATRIUM_ENV`` picks a profile (development, test, production) whose values fill every field
the environment left unset; any field can still be set with ``ATRIUM_<FIELD>``. Production
refuses to start when a secret is left at its development default or a server URL is missing,
so a misconfigured deploy fails loudly at boot instead of quietly running on SQLite.
"""

from __future__ import annotations

import ipaddress
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

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
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""

    # Database
    database_url: str = ""
    # Connections kept open per process. Overflow connections are closed as soon as they are
    # returned, so under sustained load beyond the pool each request would open one (bench/README.md):
    # the pool is sized for the steady state (as asyncpg's own pool, 20) and overflow is opt-in.
    database_pool_size: int = Field(20, ge=1)
    database_max_overflow: int = Field(0, ge=0)
    database_pool_timeout: float = Field(5.0, gt=0)
    database_pool_recycle: int = 1800
    database_pool_pre_ping: bool = True
    # With pre-ping on, a pooled connection's socket is checked on every checkout; one idle this many
    # seconds or more is also pinged with a round trip (core.db.session._Pinger). 0 = ping every checkout.
    database_pool_ping_after: float = Field(1.0, ge=0)
    database_connect_timeout: float = Field(5.0, gt=0)  # PostgreSQL: seconds to open a connection
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
    # worker runs that check.
    broker_heartbeat_timeout_ms: int = Field(60_000, ge=1000)
    broker_maintenance_chance: int = Field(1000, ge=1, le=1_000_000)
    run_worker_in_process: bool = False  # development: jobs run inside the API process
    relay_outbox_in_api: bool = True  # the API wakes the relay right after each commit
    outbox_poll_interval: float = Field(1.0, gt=0)
    outbox_batch_size: int = Field(100, ge=1)

    # Email
    email_backend: Literal["console", "memory", "smtp"] = "console"
    email_from: str = "Atrium <no-reply@atrium.local>"
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = 10.0

    # Payments (the billing module's gateway)
    payments_backend: Literal["fake", "http"] = "fake"
    payments_url: str = ""
    payments_api_key: str = ""
    payments_webhook_secret: str = ""
    payments_timeout: float = Field(10.0, gt=0)
    payments_connect_timeout: float = Field(2.0, gt=0)
    payments_max_attempts: int = Field(3, ge=1, le=10)

    # Idempotency keys: how long a completed key replays its response, how long an in-flight
    # claim may run before another request may take the key over, and how long a duplicate waits.
    idempotency_ttl_seconds: int = Field(86_400, ge=60)
    idempotency_lease_seconds: float = Field(60.0, gt=0)
    idempotency_wait_seconds: float = Field(5.0, ge=0)
    idempotency_purge_interval: float = Field(3600.0, gt=0)

    # Security
    secret_key: str = ""
    access_token_ttl_seconds: int = Field(3600, ge=60)
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
            if not url.startswith("postgresql"):
                where = url.split("@")[-1]  # never echo a password
                raise ConfigError(f"ATRIUM_DATABASE_REPLICA_URLS: {where!r} is not a PostgreSQL URL")
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

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env is not Environment.PRODUCTION:
            return self
        if not self.secret_key or self.secret_key == DEV_SECRET:
            raise ConfigError("ATRIUM_SECRET_KEY is unset or left at its development default")
        if len(self.secret_key) < 32:
            raise ConfigError("ATRIUM_SECRET_KEY must be at least 32 characters in production")
        if not self.database_url:
            raise ConfigError("ATRIUM_DATABASE_URL is required in production")
        if self.database_url.startswith("sqlite"):
            raise ConfigError("ATRIUM_DATABASE_URL must point at PostgreSQL in production, not SQLite")
        if self.cache_backend == "redis" and not self.redis_url:
            raise ConfigError("ATRIUM_REDIS_URL is required in production (cache_backend=redis)")
        if self.rate_limit_backend == "redis" and not self.redis_url:
            raise ConfigError("ATRIUM_REDIS_URL is required in production (rate_limit_backend=redis)")
        if self.broker_backend == "stub":
            raise ConfigError("ATRIUM_BROKER_BACKEND=stub keeps jobs in memory; use redis or rabbitmq")
        if not self.broker_url:
            raise ConfigError("ATRIUM_BROKER_URL is required in production")
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

    A ``ConfigError`` inside pydantic's ValidationError is unwrapped so callers show one line.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, ConfigError):
                raise cause from None
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(error: Any) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "settings"
    return f"ATRIUM_{field.upper()}: {error['msg']}"
