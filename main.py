"""The app factory and the ``atrium`` command line.

Importing this module builds nothing: ``create_app()`` assembles the app from settings, and the
CLI functions build what their command needs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import getpass
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TextIO

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from loguru import logger
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import Route

from config import ConfigError, Settings, load_settings
from containers import build_container
from core import fastpath
from core.edge.body_limit import BodyLimitMiddleware
from core.edge.docs import install_docs
from core.edge.error_handlers import ErrorMiddleware, install_error_handlers
from core.edge.errors import AppError
from core.edge.health import router as health_router
from core.edge.middleware import RequestContextMiddleware
from core.edge.openapi import install_openapi, operation_id
from core.edge.routes import add_routes, check_provided
from core.messaging.outbox import OutboxMessage
from core.messaging.periodic import CORE, PeriodicRunner
from core.messaging.publications import EventPublication
from core.messaging.queue import ping_broker
from core.messaging.resubmit import CORE_PERIODIC
from core.module import Module, ModuleError, load_modules, select_modules
from core.observability.access_log import access_log
from core.observability.logging import configure_logging, flush_logs
from core.observability.metrics import disable_multiprocess, install_metrics, prepare_serve, serve_metrics
from core.observability.tracing import (
    UnsampledRequests,
    configure_tracing,
    scoped_app,
    shutdown_tracing,
    skip_request,
)
from core.observability.tracing import enabled as tracing_enabled
from core.observability.tracing import provider as tracing_provider
from core.preflight import NotReady, check_broker, check_database
from core.ratelimit.limiter import RateLimitMiddleware

API_PREFIX = "/api/v1"
DISTRIBUTION = "atrium"  # [project] name in pyproject.toml: what `atrium --version` reports


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or load_settings()
    # Tracing before the container: the SQLAlchemy instrumentation traces the engines made after it
    # (this one is, by the pool metrics below). Off (no endpoint), nothing of the SDK is imported.
    configure_tracing(settings, "api")
    traced = tracing_enabled()
    configure_logging(settings.log_level, settings.log_json, traced=traced)
    modules = load_modules(settings.modules)
    container = build_container(settings, modules)
    # ATRIUM_API_MODULES: the routes this process serves; every module stays loaded (facades, outbox routes).
    served = select_modules(modules, settings.api_modules, "ATRIUM_API_MODULES")

    app = FastAPI(
        title="Atrium",
        version="0.1.0",
        summary="A modular monolith: " + ", ".join(m.name for m in served),
        lifespan=_lifespan,
        root_path=settings.root_path,
        docs_url=None,  # core.edge.docs serves /docs and /redoc offline
        redoc_url=None,
        telemetry=_telemetry(traced),
        generate_unique_id_function=operation_id,  # "<module>.<endpoint>" (core/edge/openapi.py)
    )
    app.state.settings = settings
    app.state.container = container
    app.state.modules = modules
    app.state.providers = {}
    install_error_handlers(app)
    install_openapi(app, container.rate_limits())  # every error documented as the envelope

    # One flat route table (core.edge.routes.add_routes): no nested routers to walk on every request.
    add_routes(app.router, health_router)
    owned: list[tuple[str, list[Any]]] = []  # each module's routes: their spans carry its name
    for module in served:
        if module.router is not None:
            first = len(app.router.routes)
            add_routes(app.router, module.router, prefix=API_PREFIX)
            owned.append((module.name, app.router.routes[first:]))
    # /docs and /redoc with their assets served by the app (no CDN); after the API's routes, so
    # an API request never asks them whether they match.
    install_docs(app)
    check_provided(app.router, container)  # a Provided("...") typo fails here, not on a request

    # Added innermost first: RequestContext -> metrics -> ErrorMiddleware -> RateLimit -> BodyLimit
    # -> routes (a 429 or a 413 carries the request id and is counted like any other response).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, limits=container.rate_limits())
    app.add_middleware(ErrorMiddleware)
    install_metrics(app, container.metrics_registry(), pool=container.pool_metrics())
    app.add_middleware(RequestContextMiddleware)
    if container.fast_path():
        # The lean request handler (core/fastpath/README.md).
        fastpath.install(app.router, container.fast_path())
    if traced:
        for name, routes in owned:
            _scope_routes(routes, name)
        # Outermost: a request the edge did not sample runs untraced (core/observability/tracing.py).
        app.add_middleware(UnsampledRequests)
    return app


def _telemetry(traced: bool) -> TelemetryConfig:
    """FastAPI's native OpenTelemetry: the SERVER span of each request when tracing is on.

    Off, everything is off: the hook would ask the global OTel providers (and os.environ) on every
    request whether to trace, ~4% of a cached read for nothing (bench/README.md). On, only the
    SERVER span: its metrics and logs would go to OTel providers Atrium does not configure
    (Prometheus has the metrics, loguru the logs), and the per-operation spans (dependencies,
    endpoint, serialization) come from FastAPI's own request handler only, which the fast path's
    handler replaces: without them a request's trace has the same shape on both paths (the SERVER
    span, then the database, cache and HTTP calls beneath it). Its ``exclude`` hook is where a
    request is sampled or not (``skip_request``): an unsampled request gets no SERVER span at all.
    """
    if not traced:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"tracing": True, "metrics": False, "logs": False, "operation_spans": False,
            "tracer_provider": tracing_provider(), "exclude": skip_request}


def _scope_routes(routes: Sequence[Any], module: str) -> None:
    """Each route's ASGI app (the fast path's or FastAPI's) runs in ``module_scope(module)``: its
    spans, and the request's SERVER span, carry ``atrium.module``. A route without its own app (a
    nested router that ``add_routes`` had to include as it is) stays ``core``."""
    for route in routes:
        if isinstance(route, Route):
            route.app = scoped_app(route.app, module)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    container = app.state.container
    if settings.auto_migrate:
        from migrations import upgrade

        await asyncio.to_thread(upgrade, settings)
    # Again after a previous lifespan of this process shut tracing down (tests start many apps).
    configure_tracing(settings, "api")
    await container.init_resources()
    app.state.sessions = container.sessions()
    app.state.read_sessions = container.read_sessions()  # core.edge.routes.ReadSession; or the primary
    app.state.tokens = container.tokens()
    app.state.authority = container.authority()  # core.edge.auth: what a session may do now
    if app.state.authority is None:
        logger.warning("no enabled module provides 'authority' (the accounts): every bearer token "
                       "is refused")
    cache, broker, jobs, relay = container.cache(), container.broker(), container.jobs(), container.relay()
    engine = container.engine()

    async def database() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def broker_check() -> None:
        await asyncio.to_thread(ping_broker, broker)

    app.state.health_checks = {"database": database, "cache": cache.ping, "broker": broker_check}
    app.state.health_timeout = settings.health_timeout

    worker = None
    if settings.run_worker_in_process:
        jobs.bridge.bind(asyncio.get_running_loop())
        running = select_modules(app.state.modules, settings.worker_modules, "ATRIUM_WORKER_MODULES")
        worker = start_worker(broker, jobs, running, settings.worker_threads)
    if settings.relay_outbox_in_api:
        relay.start()
    names = ",".join(m.name for m in app.state.modules)
    logger.info("atrium started: env={} modules={}", settings.env, names)
    _freeze_startup_heap()
    try:
        yield
    finally:
        if settings.relay_outbox_in_api:
            await relay.stop()
        if worker is not None:
            # Off the loop: the worker's threads may be waiting on coroutines scheduled on it.
            await asyncio.to_thread(worker.stop)
        await container.shutdown_resources()  # disposes the pool, closes cache and broker
        await asyncio.to_thread(shutdown_tracing)  # exports the spans still waiting
        logger.info("atrium stopped")
        access_log().flush()
        flush_logs()  # uvicorn may end a worker by its signal next, which skips atexit


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Moves everything built at start-up (modules, the app, the container, the pool) out of the
    garbage collector's sight: a full collection then scans what requests left behind instead of
    about 120k long-lived objects, about 80 ms here, which showed as the latency tail
    (bench/README.md). Once per process: a process that starts many apps (the tests) pays it once."""
    global _heap_frozen
    if _heap_frozen:
        return
    _heap_frozen = True
    gc.collect()
    gc.freeze()


# --- command line ---------------------------------------------------------------------------


def run_worker(settings: Settings, threads: int | None = None) -> None:
    """Run the jobs of ``worker_modules`` (all enabled ones by default) and the outbox relay until
    SIGINT/SIGTERM."""
    stop = threading.Event()  # handlers first: a SIGTERM during start-up still stops cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    configure_logging(settings.log_level, settings.log_json,
                      traced=bool(settings.otel_exporter_otlp_endpoint))
    disable_multiprocess()  # the worker serves its own metrics, never into `serve`'s shared files
    modules = load_modules(settings.modules)
    container = build_container(settings, modules)  # every enabled module: providers, outbox routes
    running = select_modules(modules, settings.worker_modules, "ATRIUM_WORKER_MODULES")
    # Both servers answer, and the schema is there, before any thread starts: else the relay and
    # the consumers log a failure per retry, forever. Core's newest table: a database migrated before
    # it (an older release's) is caught here too, not by every job failing on it.
    asyncio.run(check_database(settings.database_url, settings.database_connect_timeout,
                               table=EventPublication.__tablename__))
    if settings.broker_backend != "stub":
        check_broker(settings.broker_backend, settings.broker_url, settings.health_timeout)
    # After the checks (their connections are no job's), before the engine is made (its statements
    # are traced from then on).
    configure_tracing(settings, "worker")
    bridge = container.bridge()
    bridge.start_thread()
    bridge.run(_init_resources(container))
    jobs, relay, broker = container.jobs(), container.relay(), container.broker()
    housekeeping: list[asyncio.Task[None]] = []
    # Core's own periodic jobs (the publication registry's resubmitter) run with the root container.
    periodic = PeriodicRunner(container.sessions(),
                              {CORE: container, **{m.name: getattr(container, m.name) for m in running}},
                              [*CORE_PERIODIC, *(p for m in running for p in m.periodic)], settings)

    async def start_background() -> None:
        relay.start()
        periodic.start()
        housekeeping.append(asyncio.create_task(
            container.idempotency().purge_forever(settings.idempotency_purge_interval),
            name="idempotency-purge",
        ))

    async def stop_background() -> None:
        await periodic.stop()
        for t in housekeeping:
            t.cancel()
        await asyncio.gather(*housekeeping, return_exceptions=True)
        await relay.stop()

    bridge.run(start_background())
    worker = start_worker(broker, jobs, running, threads or settings.worker_threads)
    container.pool_metrics()  # jobs, outbox and pool metrics, on the worker's own port
    stop_metrics = serve_metrics(container.metrics_registry(), settings.worker_metrics_host,
                                 settings.worker_metrics_port)
    logger.info("worker started: tasks={} periodic={}",
                ",".join(sorted(n for m in running for n in m.actors)) or "none (outbox relay only)",
                ",".join(periodic.names) or "none")
    stop.wait()
    logger.info("worker stopping: finishing jobs in progress")
    if worker is not None:
        worker.stop(timeout=30_000)
    bridge.run(stop_background())
    if stop_metrics is not None:
        stop_metrics()
    bridge.run(_shutdown_resources(container))
    bridge.stop_thread()
    shutdown_tracing()  # exports the spans still waiting
    logger.info("worker stopped")


def actor_queues(jobs: Any, modules: Sequence[Module]) -> set[str]:
    """The broker queues of these modules' actors: what a worker running only them consumes."""
    return {jobs.queue_of(name) for module in modules for name in module.actors}


def start_worker(broker: Any, jobs: Any, modules: Sequence[Module], threads: int) -> Any:
    """A started ``dramatiq.Worker`` consuming only ``modules``' queues (None when they have no actor).

    Every enabled module's actors stay declared on the broker, so this process's outbox relay routes
    any job or event; the worker just does not consume the other modules' queues.
    """
    import dramatiq

    queues = actor_queues(jobs, modules)
    if not queues:
        return None  # dramatiq reads an empty whitelist as "every queue"
    worker = dramatiq.Worker(broker, worker_threads=threads, queues=queues)
    worker.start()
    return worker


async def _init_resources(container: Any) -> None:
    """Start the container's resources on the running loop (they hold loop-bound connections)."""
    await container.init_resources()


async def _shutdown_resources(container: Any) -> None:
    await container.shutdown_resources()


async def create_admin(settings: Settings, email: str, password: str, full_name: str) -> Any:
    from core.db.session import UnitOfWork

    await check_database(settings.database_url, settings.database_connect_timeout)
    container = build_container(settings)
    await _init_resources(container)
    try:
        async with UnitOfWork(container.sessions()) as session:
            return await container.users.service().create_admin(session, email, password, full_name)
    finally:
        await _shutdown_resources(container)


async def change_user(settings: Settings, command: str, email: str, *, revoke: bool = False) -> str:
    """``disable-user`` / ``enable-user`` / ``set-admin``: one use case of the users module in a unit of
    work. The container has the configured cache, so the commit invalidates what API processes keep
    of the account's sessions: live tokens follow within ``auth_cache_seconds`` (README "Sessions")."""
    from core.db.session import UnitOfWork

    await check_database(settings.database_url, settings.database_connect_timeout)
    container = build_container(settings)
    await _init_resources(container)
    try:
        service = container.users.service()
        async with UnitOfWork(container.sessions()) as session:
            if command == "set-admin":
                return str(await service.set_admin(session, email, not revoke))
            return str(await service.set_active(session, email, command == "enable-user"))
    finally:
        await _shutdown_resources(container)


async def outbox_status(settings: Settings, older_than: float, as_json: bool) -> str:
    """``atrium outbox status``: the publication registry (docs/redelivery.md), as text or JSON."""
    import json

    from core.messaging.resubmit import status

    await check_database(settings.database_url, settings.database_connect_timeout,
                         table=OutboxMessage.__tablename__)
    container = build_container(settings)
    await _init_resources(container)
    try:
        report = await status(container.sessions(), older_than=older_than)
    finally:
        await _shutdown_resources(container)
    if as_json:
        return json.dumps(report.as_json(), indent=2)
    return "\n".join(_status_lines(report, older_than))


def _status_lines(report: Any, older_than: float) -> list[str]:
    counts = " ".join(f"{state}={n}" for state, n in report.by_status.items())
    oldest = report.oldest_incomplete_seconds
    lines = [f"publications: {counts}",
             "oldest incomplete: " + ("none" if oldest is None else f"{oldest:.0f} s")]
    for task, by in sorted(report.by_task.items()):
        lines.append(f"  {task:<32} " + " ".join(f"{state}={n}" for state, n in sorted(by.items())))
    lines.append(f"incomplete, first sent more than {older_than:g} s ago: {report.incomplete_total}")
    for row in report.incomplete:
        error = f"  {row.last_error}" if row.last_error else ""
        lines.append(f"  {row.message_id}  {row.task:<32} {row.status:<11} {row.age_seconds:>8.0f} s  "
                     f"resubmissions={row.resubmissions}{error}")
    if report.incomplete_total > len(report.incomplete):
        hidden = report.incomplete_total - len(report.incomplete)
        lines.append(f"  ... and {hidden} more (the oldest are listed)")
    return lines


async def outbox_resubmit(settings: Settings, args: argparse.Namespace) -> list[str]:
    """``atrium outbox resubmit``: send again what never completed; one line per publication."""
    from dramatiq.errors import DramatiqError
    from redis.exceptions import RedisError

    from core.messaging.resubmit import Resubmitter

    await check_database(settings.database_url, settings.database_connect_timeout,
                         table=OutboxMessage.__tablename__)
    if not args.dry_run:
        if settings.broker_backend == "stub":
            raise UsageError("outbox resubmit: ATRIUM_BROKER_BACKEND=stub keeps its messages inside the API "
                             "process; resubmit with the Redis or RabbitMQ broker (or use --dry-run)")
        check_broker(settings.broker_backend, settings.broker_url, settings.health_timeout)
    older_than = settings.outbox_resubmit_after_seconds if args.older_than is None else args.older_than
    container = build_container(settings)
    await _init_resources(container)
    try:
        resubmitter = Resubmitter(container.sessions(), container.relay())
        try:  # a broker that stops answering midway: what was sent before stays marked
            done = await resubmitter.resubmit(older_than=older_than, include_failed=args.failed,
                                              message_id=args.message_id, dry_run=args.dry_run)
        except (DramatiqError, RedisError, OSError) as exc:
            raise NotReady(f"ATRIUM_BROKER_URL: the broker stopped answering ({type(exc).__name__}: "
                           f"{exc}); run it again") from None
    finally:
        await _shutdown_resources(container)
    verb = "would resubmit" if args.dry_run else "resubmitted"
    lines = []
    for r in done:
        if r.error is not None:
            lines.append(f"not resubmitted {r.message_id} {r.task} ({r.error}): marked failed")
        else:
            lines.append(f"{verb} {r.message_id} {r.task} (was {r.status}, last sent "
                         f"{r.age_seconds:.0f} s ago, resubmission {r.resubmissions})")
    sent = sum(1 for r in done if r.error is None)
    lines.append(f"{verb} {sent} publication(s)" if done else "nothing to resubmit")
    return lines


class UsageError(Exception):
    """A command line that cannot be carried out as given: one line, exit 2."""


def admin_password(args: argparse.Namespace, stdin: TextIO | None = None,
                   prompt: Callable[[str], str] = getpass.getpass) -> str:
    """``create-admin``'s password: ``--password``, the first line of stdin (``--password-stdin``), or
    typed twice at a prompt that does not echo it. The users module's rules apply afterwards."""
    stdin = stdin or sys.stdin
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        line = stdin.readline()
        if not line:
            raise UsageError("create-admin: --password-stdin: stdin is empty; pipe the password in, "
                             "one line")
        return line.removesuffix("\n").removesuffix("\r")
    if not stdin.isatty():
        raise UsageError("create-admin: no terminal to ask for the password; use --password-stdin "
                         "(printf '%s\\n' \"$PW\" | atrium create-admin --email ... --password-stdin)")
    try:
        password = prompt("Password: ")
        again = prompt("Password (again): ")
    except EOFError:
        raise UsageError("create-admin: no password typed") from None
    if password != again:
        raise UsageError("create-admin: the two passwords differ; nothing was created")
    return password


def describe_modules(modules: Sequence[Module]) -> str:
    lines: list[str] = []
    for module in modules:
        lines.append(f"{module.name}  (depends on: {', '.join(module.depends_on) or '-'})")
        if module.router is not None:
            for route in module.router.routes:
                methods = ",".join(sorted(getattr(route, "methods", None) or []))
                lines.append(f"  route  {methods:<7} {API_PREFIX}{getattr(route, 'path', '')}")
        for t in module.tasks:
            lines.append(f"  actor  {t.name}")
        for event, handlers in module.subscriptions.items():
            for h in handlers:
                lines.append(f"  on     {event.name} -> {h.name}")
        for table in module.tables:
            lines.append(f"  table  {table}")
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    """argparse type: a count of processes or threads (0 would start a worker that takes no job)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _port(text: str) -> int:
    """argparse type: a TCP port (uvicorn would wrap 99999 silently around to another one)."""
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _seconds(text: str) -> float:
    """argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _message_id(text: str) -> uuid.UUID:
    """argparse type: an outbox message id (a UUID, as `atrium outbox status` prints it)."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an outbox message id (a UUID)") from None


def _version() -> str:
    """The installed distribution's version (pyproject.toml's ``[project] name``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _setting(name: str) -> str:
    """"ATRIUM_<NAME> or <its default>" for a help text: an option left out takes the setting."""
    default = Settings.model_fields[name].default
    shown = ",".join(default) if isinstance(default, tuple) else default
    return f"ATRIUM_{name.upper()}" + (f" or {shown}" if shown not in ("", ()) else "")


def _parser() -> argparse.ArgumentParser:
    """The command line. Every option's help says its default (tests/test_cli_polish.py checks)."""
    parser = argparse.ArgumentParser(prog="atrium", description="Atrium modular monolith")
    parser.add_argument("--version", action="version", version=f"atrium {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the command to run")
    serve = sub.add_parser("serve", help="serve the API with uvicorn")
    serve.add_argument("--host", help=f"the address to listen on (default: {_setting('host')})")
    serve.add_argument("--port", type=_port, help=f"the TCP port to listen on (default: {_setting('port')})")
    serve.add_argument("--workers", type=_at_least_one, default=1,
                       help="API processes; more than 1 turns on multiprocess metrics (default: %(default)s)")
    serve.add_argument("--modules", help="serve only these modules' routes, e.g. users,items; all enabled "
                                         "modules stay loaded (default: ATRIUM_API_MODULES, else every "
                                         "module of ATRIUM_MODULES)")
    worker = sub.add_parser("worker", help="run the job worker and the outbox relay")
    worker.add_argument("--threads", type=_at_least_one,
                        help=f"job threads (default: {_setting('worker_threads')})")
    worker.add_argument("--modules", help="run only these modules' actors, e.g. billing; the relay still "
                                          "routes every module (default: ATRIUM_WORKER_MODULES, else every "
                                          "module of ATRIUM_MODULES)")
    migrate = sub.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("revision", nargs="?", default=None,
                         help="a revision such as items@head (default: core and every enabled module's head)")
    revision = sub.add_parser("revision", help="add a migration to a module's (or core's) own history")
    revision.add_argument("branch", help="a module name, or core")
    revision.add_argument("-m", "--message", required=True, help="what the migration does (required)")
    revision.add_argument("--autogenerate", action="store_true",
                          help="diff the models against the database (migrate it first) (default: off, "
                               "an empty migration)")
    scaffold = sub.add_parser("new-module", help="write a working module folder and its tests")
    scaffold.add_argument("name", help="snake_case, plural, e.g. notes")
    scaffold.add_argument("--entity", help="the singular used in code (default: derived, e.g. note)")
    admin = sub.add_parser("create-admin", help="create an administrator account; asks for the password "
                                                "(twice) unless --password-stdin or --password")
    admin.add_argument("--email", required=True, help="the administrator's email (required)")
    given = admin.add_mutually_exclusive_group()
    given.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin, for scripts: printf '%%s\\n' "
                            "\"$PW\" | atrium create-admin --email ... --password-stdin (default: off, "
                            "prompt on the terminal)")
    given.add_argument("--password", help="the password itself; it stays in your shell history and in the "
                                          "process list: prefer the prompt or --password-stdin (default: "
                                          "prompt on the terminal)")
    admin.add_argument("--full-name", default="Administrator", help="the account's full name "
                                                                    "(default: %(default)s)")
    disable = sub.add_parser("disable-user", help="disable an account and end its sessions (within 1 s)")
    disable.add_argument("email", help="the account's email")
    enable = sub.add_parser("enable-user", help="enable a disabled account (its user signs in again)")
    enable.add_argument("email", help="the account's email")
    role = sub.add_parser("set-admin", help="make an account an administrator (its tokens follow within 1 s)")
    role.add_argument("email", help="the account's email")
    role.add_argument("--revoke", action="store_true",
                      help="take the administrator role away instead (default: off, grant it)")
    outbox = sub.add_parser("outbox", help="the event-publication registry: which messages the outbox sent "
                                           "and whether their job completed (docs/redelivery.md)")
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION",
                                    help="status or resubmit")
    status = actions.add_parser("status", help="counts per status and task, the oldest incomplete "
                                                "publication's age, and the incomplete ones")
    status.add_argument("--older-than", type=_seconds, default=0.0, metavar="SECONDS",
                        help="list the incomplete publications first sent more than SECONDS ago "
                             "(default: %(default)g, all of them)")
    status.add_argument("--json", action="store_true",
                        help="one JSON object for machines (default: off, text)")
    resubmit = actions.add_parser("resubmit", help="send again the messages whose job has not completed "
                                                   "(the job's inbox makes a duplicate harmless)")
    resubmit.add_argument("--older-than", type=_seconds, metavar="SECONDS",
                          help="only publications last sent more than SECONDS ago (default: "
                               f"{_setting('outbox_resubmit_after_seconds')})")
    resubmit.add_argument("--failed", action="store_true",
                          help="also those whose job gave up after its last retry (default: off)")
    resubmit.add_argument("--id", type=_message_id, dest="message_id", metavar="MESSAGE_ID",
                          help="only this outbox message's publications, whatever their age, failed ones "
                               "included (default: every message)")
    resubmit.add_argument("--dry-run", action="store_true",
                          help="print what would be resubmitted and send nothing (default: off)")
    listing = sub.add_parser("modules", help="list enabled modules, their routes, actors and tables")
    checks = listing.add_subparsers(dest="modules_command", metavar="CHECK",
                                    help="a check to run instead (default: none, list the modules)")
    verify = checks.add_parser("verify", help="check the module rules: cycles, imports, dependencies, "
                                              "actors, tables, container")
    verify.add_argument("--enabled", action="store_true",
                        help="only ATRIUM_MODULES (default: off, every package under modules/)")
    docs = checks.add_parser("docs", help="write docs/modules.md (diagram, routes, facades, events, ...)")
    docs.add_argument("--check", action="store_true",
                      help="exit 1 when the file is stale, write nothing (default: off, write it)")
    docs.add_argument("--output",
                      help="the file to write or check (default: docs/modules.md next to main.py)")
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        return _dispatch(args, settings)
    except (ConfigError, ModuleError, NotReady, UsageError) as exc:  # one line naming the setting
        print(f"atrium: {exc}", file=sys.stderr)
        return 2
    except AppError as exc:  # e.g. create-admin with a taken email or a weak password
        print(f"atrium: {exc.message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:  # after the command's start-up check: while it ran
        status, line = _database_failure(args.command, exc)
        print(f"atrium: {line}", file=sys.stderr)
        return status


def _database_failure(command: str, exc: SQLAlchemyError) -> tuple[int, str]:
    """The exit status and the one line for a database error a command met after its start-up check."""
    from core.db.engine import database_unavailable
    from core.preflight import cause, missing_table

    table = missing_table(exc)
    if table is not None and command != "migrate":
        return 2, f"ATRIUM_DATABASE_URL: the database has no table {table!r}; run `atrium migrate` first"
    if database_unavailable(exc):
        return 2, f"ATRIUM_DATABASE_URL: the database stopped answering ({cause(exc)})"
    return 1, f"database error: {cause(exc)}"


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` the way uvicorn will, and let go: a ``UsageError`` line instead of uvicorn's
    "[Errno 98]" among its start-up lines (and make's "Error 3") when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn's too: TIME_WAIT is fine
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"serve: port {port} on {host} is in use; pick another with --port "
                             f"(make run ARGS='--port {port + 1 if port < 65535 else 8001}')") from None
        reason = exc.strerror or str(exc)
        raise UsageError(f"serve: cannot listen on {host}:{port} ({reason}); see --host and --port") from None


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _new_module(name: str, entity: str | None) -> int:
    from pathlib import Path

    from containers import Core
    from tooling.scaffold import new_module

    root = Path.cwd()
    if not (root / "modules").is_dir():
        raise ModuleError("run `atrium new-module` from the project's root (the folder holding modules/)")
    created = new_module(name, root, entity=entity, reserved=set(Core.providers))
    for path in created:
        print(f"created {path.relative_to(root)}")
    _module_docs(None, check=False)  # docs/modules.md describes every module on disk, the new one too
    print(f"next: add {name} to ATRIUM_MODULES (e.g. ATRIUM_MODULES=users,items,billing,{name}), then "
          f"`atrium migrate` and `make test`")
    return 0


def _verify_modules(settings: Settings, enabled_only: bool) -> int:
    """``atrium modules verify``: one line per violation on stdout; exit 1 when there is any."""
    from pathlib import Path

    from tooling.verify import RULES, discover, verify

    names = list(settings.modules) if enabled_only else discover()
    violations = verify(names, Path(__file__).resolve().parent,
                        build=lambda modules: build_container(settings, modules))
    for violation in violations:
        print(violation)
    if violations:
        print(f"atrium: modules verify: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print(f"modules verify: ok ({', '.join(names)}; rules: {', '.join(RULES)})")
    return 0


def _module_docs(output: str | None, check: bool) -> int:
    """``atrium modules docs [--check]``: write docs/modules.md, or exit 1 when it is stale."""
    from pathlib import Path

    from tooling.module_docs import render
    from tooling.verify import discover

    path = Path(output) if output else Path(__file__).resolve().parent / "docs" / "modules.md"
    text = render(load_modules(discover()), api_prefix=API_PREFIX)
    if check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"atrium: {path} is stale: run `atrium modules docs` and commit it", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        import uvicorn

        if args.modules is not None:  # uvicorn's factory (and its worker processes) read the environment
            settings = load_settings(api_modules=args.modules)
            os.environ["ATRIUM_API_MODULES"] = ",".join(settings.api_modules)
        load_modules(settings.modules)  # fail fast, before uvicorn, with our one-line message
        host, port = args.host or settings.host, args.port or settings.port
        check_listen(host, port)
        if settings.auto_migrate:  # the app migrates at start: the database must answer now
            asyncio.run(check_database(settings.database_url, settings.database_connect_timeout))
        prepare_serve(args.workers, settings.metrics_multiproc_dir, port)  # before any worker exists
        # uvicorn stops gracefully on SIGTERM/SIGINT (no new connections, in-flight requests
        # finish, lifespan shutdown) and then raises the signal again; a stop that was asked for
        # ends the process with status 0, not "killed by SIGTERM", which process managers log as a crash.
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, _exit_cleanly)
        uvicorn.run(
            "main:create_app", factory=True,
            host=host, port=port, workers=args.workers,
            log_config=None, access_log=False, server_header=False,
            # X-Forwarded-For is believed only from the proxies the settings trust (nginx, the
            # ingress); uvicorn's default would trust any local process.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
        )
        return 0
    if args.command == "worker":
        if args.modules is not None:
            settings = load_settings(worker_modules=args.modules)
        run_worker(settings, args.threads)
        return 0
    if args.command == "new-module":
        return _new_module(args.name, args.entity)
    if args.command == "revision":
        from migrations import new_revision

        if args.autogenerate:  # compares the models with the database: it must answer
            asyncio.run(check_database(settings.database_url, settings.database_connect_timeout))
        print(f"created {new_revision(settings, args.branch, args.message, args.autogenerate)}")
        return 0
    if args.command == "migrate":
        from alembic.util import CommandError

        from migrations import upgrade

        configure_logging(settings.log_level, settings.log_json, enqueue=False)
        asyncio.run(check_database(settings.database_url, settings.database_connect_timeout))
        try:  # one line per revision applied, as it is applied; alembic's own lines are DEBUG
            applied = upgrade(settings, args.revision, report=lambda line: print(line, flush=True))
        except CommandError as exc:  # e.g. a revision that does not exist
            print(f"atrium: migrate: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        if not applied:
            print(f"schema up to date ({args.revision or 'head'}: core, {', '.join(settings.modules)})")
        return 0
    if args.command == "create-admin":
        password = admin_password(args)  # before any connection: a missing password costs nothing
        configure_logging(settings.log_level, settings.log_json, enqueue=False)
        user = asyncio.run(create_admin(settings, args.email, password, args.full_name))
        print(f"admin created: {user.id} {user.email}")
        return 0
    if args.command in ("disable-user", "enable-user", "set-admin"):
        configure_logging(settings.log_level, settings.log_json, enqueue=False)
        revoke = getattr(args, "revoke", False)
        print(asyncio.run(change_user(settings, args.command, args.email, revoke=revoke)))
        return 0
    if args.command == "outbox":
        configure_logging(settings.log_level, settings.log_json, enqueue=False)
        if args.outbox_command == "status":
            print(asyncio.run(outbox_status(settings, args.older_than, args.json)))
        else:
            print("\n".join(asyncio.run(outbox_resubmit(settings, args))))
        return 0
    if args.command == "modules":
        if args.modules_command == "verify":
            return _verify_modules(settings, args.enabled)
        if args.modules_command == "docs":
            return _module_docs(args.output, args.check)
        print(describe_modules(load_modules(settings.modules)))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(cli())
