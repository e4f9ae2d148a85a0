"""The root container: core infrastructure plus one sub-container per enabled module.

Every infrastructure port is chosen here from settings with ``providers.Selector``; nothing else
in the code base branches on the environment. Module containers declare what they need as
``providers.Dependency()``; ``build_container`` fills each one by name from the core providers
or from a provider of the same name exported by a module listed in ``depends_on``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dependency_injector import containers, providers
from dramatiq import Broker

from config import Settings
from core import email, fastpath, security
from core.cache import stores as cache
from core.db import engine as db_engine
from core.db import replicas, session
from core.edge.idempotency import IdempotencyStore
from core.edge.pagination import CursorCodec
from core.messaging import queue
from core.messaging.outbox import Inbox, Outbox, OutboxRelay
from core.module import Module, ModuleError, load_modules
from core.observability import metrics
from core.ratelimit import limiter as ratelimit


def _event_routes(modules: Sequence[Module]) -> dict[str, list[str]]:
    routes: dict[str, list[str]] = {}
    for module in modules:
        for event, tasks in module.routes().items():
            routes.setdefault(event, []).extend(tasks)
    return routes


async def _closing_cache(adapter: cache.Cache) -> AsyncIterator[cache.Cache]:
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def _closing_rate_limiter(limiter: ratelimit.RateLimiter) -> AsyncIterator[ratelimit.RateLimiter]:
    try:
        yield limiter
    finally:
        await limiter.aclose()


async def _closing_broker(broker: Broker) -> AsyncIterator[Broker]:
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.close)


def _pool_options(s: Settings) -> dict[str, Any]:
    """The engine options the primary and every replica share."""
    return {
        "pool_size": s.database_pool_size,
        "max_overflow": s.database_max_overflow,
        "pool_timeout": s.database_pool_timeout,
        "pool_recycle": s.database_pool_recycle,
        "pool_pre_ping": s.database_pool_pre_ping,
        "echo": s.database_echo,
        "connect_timeout": s.database_connect_timeout,
        "statement_timeout": s.database_statement_timeout,
        "ping_after": s.database_pool_ping_after,
    }


def _fast_options(pieces: frozenset[str]) -> dict[str, bool]:
    """The engine options of the fast path's database pieces."""
    return {"fast_path": "transactions" in pieces, "fair_pool": "pool" in pieces}


class Core(containers.DeclarativeContainer):
    """Infrastructure every module may ask for, by these provider names."""

    __self__ = providers.Self()
    settings = providers.Dependency(instance_of=Settings)
    modules = providers.Dependency(instance_of=list)

    # Whether the fast path serves this process (core/fastpath/README.md): resolved once, logged once.
    fast_path = providers.Singleton(
        fastpath.pieces, settings.provided.fast_path, settings.provided.fast_path_skip
    )

    engine = providers.Singleton(
        lambda s, fast: db_engine.create_engine(s.database_url, **_fast_options(fast), **_pool_options(s)),
        settings, fast_path,
    )
    sessions = providers.Singleton(session.session_factory, engine)
    # Read replicas: one engine per URL with the primary's pool options; ``read_sessions`` spreads
    # read-only use cases over them and falls back to ``sessions`` (none configured, or all down).
    replica_engines = providers.Singleton(
        # Always pinged on checkout (ping_after=0): ReadSessions learns that a replica is down from
        # that ping and sends the read to the primary; a skipped ping would make the read fail.
        lambda s, fast: db_engine.create_engines(
            s.database_replica_urls, **_fast_options(fast), **{**_pool_options(s), "ping_after": 0.0}
        ),
        settings, fast_path,
    )
    read_sessions = providers.Singleton(
        replicas.ReadSessions, sessions, replica_engines, cooloff=settings.provided.database_replica_cooloff
    )
    # Resources only close what the Singletons opened, so ``init_resources()`` resolves just the
    # adapters the Selectors chose and no provider turns asynchronous.
    engine_lifecycle = providers.Resource(db_engine.engine_lifecycle, engine)
    replica_engines_lifecycle = providers.Resource(db_engine.engines_lifecycle, replica_engines)

    cache = providers.Selector(
        settings.provided.cache_backend,
        memory=providers.Singleton(cache.MemoryCache),
        none=providers.Singleton(cache.NullCache),
        redis=providers.Singleton(
            cache.RedisCache.from_url,
            settings.provided.redis_url,
            namespace=settings.provided.cache_namespace,
            pipelined=providers.Callable(lambda pieces: "redis" in pieces, fast_path),
        ),
    )

    _retry = providers.Dict(
        max_retries=settings.provided.job_max_retries,
        min_backoff_ms=settings.provided.job_min_backoff_ms,
        max_backoff_ms=settings.provided.job_max_backoff_ms,
        time_limit_ms=settings.provided.job_time_limit_ms,
    )
    broker = providers.Selector(
        settings.provided.broker_backend,
        stub=providers.Singleton(lambda retry: queue.stub_broker(**retry), _retry),
        redis=providers.Singleton(
            lambda url, ns, s, retry: queue.redis_broker(
                url, ns, heartbeat_timeout=s.broker_heartbeat_timeout_ms,
                maintenance_chance=s.broker_maintenance_chance, **retry,
            ),
            settings.provided.broker_url, settings.provided.broker_namespace, settings, _retry,
        ),
        rabbitmq=providers.Singleton(
            lambda url, retry: queue.rabbitmq_broker(url, **retry), settings.provided.broker_url, _retry
        ),
    )

    cache_lifecycle = providers.Resource(_closing_cache, cache)
    broker_lifecycle = providers.Resource(_closing_broker, broker)

    email_sender = providers.Selector(
        settings.provided.email_backend,
        console=providers.Singleton(email.ConsoleEmailSender, sender=settings.provided.email_from),
        memory=providers.Singleton(email.InMemoryEmailSender),
        smtp=providers.Singleton(
            email.SmtpEmailSender,
            host=settings.provided.smtp_host,
            port=settings.provided.smtp_port,
            sender=settings.provided.email_from,
            username=settings.provided.smtp_username,
            password=settings.provided.smtp_password,
            starttls=settings.provided.smtp_starttls,
            timeout=settings.provided.smtp_timeout,
            message_id_domain=settings.provided.email_message_id_domain,
        ),
    )

    password_hasher = providers.Singleton(
        security.PasswordHasher,
        time_cost=settings.provided.password_time_cost,
        memory_cost=settings.provided.password_memory_cost,
    )
    tokens = providers.Singleton(
        security.TokenService,
        secret=settings.provided.secret_key,
        ttl_seconds=settings.provided.access_token_ttl_seconds,
        issuer=settings.provided.token_issuer,
    )
    # What a session may do now (core.security.AuthorityStore, read by core.edge.auth on every
    # authenticated request): the module that owns accounts exports a provider named ``authority``
    # and build_container points this one at it. None: every bearer token is refused.
    authority = providers.Object(None)

    metrics_registry = providers.Singleton(metrics.new_registry)
    job_metrics = providers.Singleton(metrics.JobMetrics, metrics_registry)
    outbox_metrics = providers.Singleton(metrics.OutboxMetrics, metrics_registry)
    pool_metrics = providers.Singleton(
        metrics.DbPoolMetrics, engine, metrics_registry,
        limit=providers.Callable(lambda s: s.database_pool_size + s.database_max_overflow, settings),
    )
    idempotency = providers.Singleton(
        IdempotencyStore,
        sessions,
        ttl_seconds=settings.provided.idempotency_ttl_seconds,
        lease_seconds=settings.provided.idempotency_lease_seconds,
        wait_seconds=settings.provided.idempotency_wait_seconds,
    )
    cursors = providers.Singleton(CursorCodec, settings.provided.secret_key)

    # Rate limits: the limiter port (chosen like the cache) and the app's policies around it.
    rate_limiter = providers.Selector(
        settings.provided.rate_limit_backend,
        memory=providers.Singleton(ratelimit.MemoryRateLimiter),
        none=providers.Singleton(ratelimit.NullRateLimiter),
        redis=providers.Singleton(
            ratelimit.RedisRateLimiter.from_url,
            settings.provided.redis_url,
            namespace=settings.provided.cache_namespace,
            timeout=settings.provided.rate_limit_timeout,
            pipelined=providers.Callable(lambda pieces: "redis" in pieces, fast_path),
        ),
    )
    rate_limiter_lifecycle = providers.Resource(_closing_rate_limiter, rate_limiter)
    rate_limits = providers.Singleton(
        ratelimit.RateLimits,
        rate_limiter,
        settings.provided.rate_limits,
        settings.provided.rate_limit_groups,
        tokens=tokens,
        registry=metrics_registry,
        trusted_proxies=settings.provided.trusted_proxies,
        fail_open=settings.provided.rate_limit_fail_open,
        login_fail_open=settings.provided.rate_limit_login_fail_open,
    )

    bridge = providers.Singleton(queue.LoopBridge)
    inbox = providers.Singleton(Inbox)
    jobs = providers.Singleton(
        lambda broker, sessions, inbox, bridge, mods, root, s, job_metrics: queue.JobRunner(
            broker, sessions, inbox, bridge,
            containers={m.name: getattr(root, m.name) for m in mods},
            tasks=[t for m in mods for t in _module_tasks(m)],
            queue_prefix=f"{s.broker_namespace}.", metrics=job_metrics,
        ),
        broker, sessions, inbox, bridge, modules, __self__, settings, job_metrics,
    )
    relay = providers.Singleton(
        lambda sessions, broker, jobs, mods, s, outbox_metrics: OutboxRelay(
            sessions, queue.BrokerSender(broker), _event_routes(mods), jobs.queue_of,
            batch_size=s.outbox_batch_size, poll_interval=s.outbox_poll_interval, metrics=outbox_metrics,
        ),
        sessions, broker, jobs, modules, settings, outbox_metrics,
    )
    outbox = providers.Singleton(Outbox, notify=relay.provided.kick)


def _module_tasks(module: Module) -> list[queue.Task]:
    seen: dict[str, queue.Task] = {t.name: t for t in module.tasks}
    for handlers in module.subscriptions.values():
        for t in handlers:
            seen.setdefault(t.name, t)
    return list(seen.values())


def build_container(settings: Settings, modules: Sequence[Module] | None = None) -> Core:
    """Build the root container for ``settings.modules`` (or the given, already-loaded list)."""
    mods = list(modules) if modules is not None else load_modules(settings.modules)
    root = Core(settings=settings, modules=mods)
    for module in mods:
        if module.name in root.providers:
            raise ModuleError(f"module name {module.name!r} collides with the core provider of that name")
        root.set_provider(module.name, providers.Container(module.container, **_wire(root, module)))
    _use_module_authority(root, mods)
    root.check_dependencies()
    return root


def _use_module_authority(root: Core, modules: Sequence[Module]) -> None:
    """Point ``authority`` at the one module that exports a provider of that name (users)."""
    owners = [m.name for m in modules if (p := m.container.providers.get("authority")) is not None
              and not isinstance(p, providers.Dependency)]
    if len(owners) > 1:
        raise ModuleError(f"modules {', '.join(owners)} each provide 'authority': only one module may "
                          "own the accounts")
    if owners:
        root.authority.override(getattr(root, owners[0]).authority)


def _wire(root: Any, module: Module) -> dict[str, providers.Provider[Any]]:
    """Match each ``providers.Dependency`` of the module's container with a provider by name."""
    wired: dict[str, providers.Provider[Any]] = {}
    for name, provider in module.container.providers.items():
        if not isinstance(provider, providers.Dependency):
            continue
        candidate = root.providers.get(name)
        if candidate is None or isinstance(candidate, providers.Container):
            candidate = next(
                (getattr(root, dep).providers[name] for dep in module.depends_on
                 if name in module_providers(root, dep)),
                None,
            )
        if candidate is None:
            options = ", ".join(sorted(p for p in root.providers if not p.startswith("_")))
            raise ModuleError(
                f"module {module.name!r} needs provider {name!r}, which neither core nor its "
                f"dependencies ({', '.join(module.depends_on) or 'none'}) provide; core offers: {options}"
            )
        wired[name] = candidate
    return wired


def module_providers(root: Any, name: str) -> dict[str, Any]:
    sub = root.providers.get(name)
    return dict(sub.providers) if isinstance(sub, providers.Container) else {}
