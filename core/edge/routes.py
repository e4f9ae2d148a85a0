"""The request edge: the routes' table, the sessions of a request and its one commit."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from loguru import logger
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from core.db.engine import database_unavailable
from core.db.session import commit, rollback
from core.edge.openapi import with_codes
from core.edge.provided import lookup, provide, provided_path
from core.module import ModuleError

_DEFAULT_LIFESPAN = type(APIRouter().lifespan_context)  # what a router without a lifespan has
# Every option of a route that ``add_api_route`` takes back (path and endpoint are passed apart).
_ROUTE_OPTIONS = tuple(
    name for name in inspect.signature(APIRouter.add_api_route).parameters
    if name not in ("self", "path", "endpoint", "route_class_override")
)


def add_routes(target: APIRouter, source: APIRouter, prefix: str = "") -> None:
    """Adds ``source``'s routes to ``target`` itself, under ``prefix``: one flat table.

    ``target.include_router(source)`` keeps ``source`` as a nested router that every request walks
    (and re-checks for changes) on its way to a route: with the three modules included under
    ``/api/v1`` that was about a fifth of a cached read's cost (bench/README.md). Each route is
    instead re-created on ``target`` with all of its options, its route class included, so the
    OpenAPI document and the behaviour are those of ``include_router`` (tests/unit/test_routes.py).
    A router holding anything but plain API routes (a websocket, a mount) or with a lifespan or
    startup/shutdown handlers of its own is included as before.
    """
    plain = all(isinstance(route, APIRoute) for route in source.routes)  # a nested router is no APIRoute
    # A router's own lifespan or startup/shutdown handlers are only merged by include_router.
    lifecycle = (source.on_startup or source.on_shutdown
                 or type(source.lifespan_context) is not _DEFAULT_LIFESPAN)
    if not plain or lifecycle:
        target.include_router(source, prefix=prefix)
        return
    for route in source.routes:
        assert isinstance(route, APIRoute)
        options = {name: getattr(route, name) for name in _ROUTE_OPTIONS}
        target.add_api_route(prefix + route.path, route.endpoint, route_class_override=type(route), **options)
        added = target.routes[-1]
        if isinstance(added, FlatRoute):
            added.table = target
    _index_methods(target)


def _index_methods(table: APIRouter) -> None:
    """Tell each flat route of ``table`` every method its path accepts: the ``Allow`` of its 405.

    Starlette answers 405 from the first route whose path matched, with that route's methods only
    (``GET /items/{id}`` said ``Allow: GET`` although PATCH and DELETE exist). The sets are made
    here, once per route added, so a request that matches pays nothing for them. Routes whose
    templates may match the same request path (``/users/me`` and ``/users/{id}``) are noted too; a
    405 asks them whether they match (FlatRoute.allow).
    """
    by_path: dict[str, set[str]] = {}
    for route in table.routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            by_path.setdefault(path, set()).update(methods)
    for route in table.routes:
        if isinstance(route, FlatRoute) and route.table is table:
            route.allowed = frozenset(by_path.get(route.path, ()))
            route.overlapping = tuple(
                other for other in table.routes
                if getattr(other, "methods", None) and getattr(other, "path", route.path) != route.path
                and _may_share_a_path(route.path, str(getattr(other, "path", "")))
            )


def _may_share_a_path(a: str, b: str) -> bool:
    """Whether two path templates may match one request path: a cheap check that errs towards yes."""
    if ":path}" in a or ":path}" in b:
        return True
    first, second = a.split("/"), b.split("/")
    return len(first) == len(second) and all(
        x == y or "{" in x or "{" in y for x, y in zip(first, second, strict=True))


class FlatRoute(APIRoute):
    """A route of a flat table (``add_routes``): rules a path out by its literal part first.

    A router tries its routes in turn, each with FastAPI's route-context lookup and its regex; in
    the flat table most routes are ruled out by a string comparison instead (about 7 % of a cached
    read, bench/README.md). The answer is the same: the regex is anchored at the path's literal
    part (up to its first parameter). The shortcut is taken only when the request is dispatched by
    the table the route was added to (``add_routes`` sets ``table``): reached any other way (an
    included router, whose prefix the route's path lacks; a mounting app) the route checks in full.

    Dispatched by its table, a request whose method the path lacks is a 405 whose ``Allow`` names
    every method of the path (``allowed``, ``overlapping``: set by ``add_routes``), not only this
    route's; routes added to the table by other means than ``add_routes`` are not counted.
    """

    table: APIRouter | None = None
    # Set by add_routes (_index_methods): every method of this route's path in its table, and the
    # routes of the table whose templates may match the same request paths.
    allowed: frozenset[str] = frozenset()
    overlapping: tuple[BaseRoute, ...] = ()

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        literal = self.path.partition("{")[0]
        self._literal, self._exact = literal, literal == self.path

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.table is not None and scope.get("router") is self.table:
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            # The path a route matches is ``path``, or what follows ``root_path`` in it.
            if not self._fits(path) and not (root and path.startswith(root) and self._fits(path[len(root):])):
                return Match.NONE, {}
        return super().matches(scope)

    def _fits(self, path: str) -> bool:
        return path == self._literal if self._exact else path.startswith(self._literal)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The router hands a route a request whose method it lacks only when no route matched the
        # request in full. Dispatched by its own table, that is a 405 naming every method of the
        # path, not only this route's; everything else is FastAPI's own handling.
        if (self.methods and scope["method"] not in self.methods
                and self.table is not None and scope.get("router") is self.table):
            headers = {"Allow": self.allow(scope)}
            if "app" in scope:  # the app's exception handlers render it (the error envelope)
                raise HTTPException(status_code=405, headers=headers)
            response = PlainTextResponse("Method Not Allowed", status_code=405, headers=headers)
            await response(scope, receive, send)
            return
        await super().handle(scope, receive, send)

    def allow(self, scope: Scope) -> str:
        """The ``Allow`` header of a 405 for ``scope``: every method any route of the table accepts
        on its path, sorted."""
        methods = set(self.allowed or self.methods or ())
        for other in self.overlapping:
            if other.matches(scope)[0] is not Match.NONE:
                methods.update(getattr(other, "methods", None) or ())
        return ", ".join(sorted(methods))


_SESSION = "atrium.db_session"  # kept in the ASGI scope: one per request
_READ_SESSION = "atrium.db_read_session"


async def _session(request: Request) -> AsyncSession:
    session: AsyncSession | None = request.scope.get(_SESSION)
    if session is None:
        session = request.scope[_SESSION] = request.app.state.sessions()
    return session


DbSession = Annotated[AsyncSession, Depends(_session)]


async def _read_session(request: Request) -> AsyncSession:
    read_sessions = request.app.state.read_sessions
    if not read_sessions.replicated:
        return await _session(request)  # no replicas: the request's one session, one connection
    session: AsyncSession | None = request.scope.get(_READ_SESSION)
    if session is None:
        session = request.scope[_READ_SESSION] = await read_sessions.open()
    return session


# A session for read-only use cases: on a read replica (round-robin), on the primary when none
# answers (core.db.session.ReadSessions). Never committed: TransactionalRoute closes it, which rolls it
# back. Without replicas it is the request's DbSession. It may lag the primary by the replication
# delay, so a read that must see the caller's own write of a moment ago takes DbSession instead
# (README "Read replicas").
ReadSession = Annotated[AsyncSession, Depends(_read_session)]


_REQUEST = "atrium_request__"  # the Request parameter a route with Provided parameters gets


def _resolve_provided(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` with its ``Provided`` parameters filled by a direct container call.

    FastAPI solves each ``Depends`` of a request through its generic machinery, about 20 µs apiece
    (bench/README.md); a ``Provided`` needs only ``provide(request, path)``. The returned endpoint
    has the same name, docstring and parameters minus the provided ones plus a ``Request``, so
    FastAPI validates, documents and names the route exactly as before.
    """
    if not inspect.iscoroutinefunction(endpoint):
        return endpoint
    hints = typing.get_type_hints(endpoint, include_extras=True)
    signature = inspect.signature(endpoint)
    provided = {name: path for name in signature.parameters
                if (path := provided_path(hints.get(name))) is not None}
    if not provided or _REQUEST in signature.parameters:
        return endpoint
    kept = [p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values() if p.name not in provided]
    # FastAPI gives the request to one parameter only: the endpoint's own, when it has one.
    own = next((p.name for p in kept if p.annotation is Request), None)
    if own is None:
        kept.append(inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
        kept.sort(key=lambda p: p.kind)  # keyword-only parameters last, as a signature requires
    paths = tuple(provided.items())

    @functools.wraps(endpoint)
    async def with_provided(**kwargs: Any) -> Any:
        request = kwargs.pop(_REQUEST) if own is None else kwargs[own]
        for name, path in paths:
            kwargs[name] = provide(request, path)
        return await endpoint(**kwargs)

    with_provided.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=kept, return_annotation=hints.get("return", signature.return_annotation))
    with_provided.provided_paths = tuple(provided.values())  # type: ignore[attr-defined]  # check_provided
    return with_provided


def check_provided(router: APIRouter, container: Any) -> None:
    """Fail now, naming the route, if a ``Provided("...")`` id of any route (its endpoint's or a
    dependency's) names no provider of ``container``: a typo fails start-up, not the first request."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        paths = list(getattr(route.endpoint, "provided_paths", ()))
        pending = [route.dependant]
        while pending:
            dependant = pending.pop()
            for sub in dependant.dependencies:
                path = getattr(sub.call, "provided_path", None)
                if isinstance(path, str):
                    paths.append(path)
                pending.append(sub)
        for path in paths:
            try:
                lookup(container, path)
            except (AttributeError, LookupError):
                methods = ",".join(sorted(route.methods or ()))
                raise ModuleError(
                    f"{methods} {route.path}: Provided({path!r}) names no provider of the container"
                ) from None


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _transactional(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        try:
            response = await handler(request)
        except BaseException:
            await _finish(request, ok=False)
            raise
        await _finish(request, ok=response.status_code < 400)
        return response

    return run


class TransactionalRoute(FlatRoute):
    """Commits the request's session after the endpoint succeeds and before the response is sent.

    The one commit of a request lives here; a 4xx/5xx response or an exception rolls back. Its
    endpoints' ``Provided`` parameters are resolved directly (``_resolve_provided``). With the fast
    path on, ``core.fastpath`` gives ordinary requests a leaner handler wrapped by the same
    ``around`` (``_transactional``).
    """

    around = staticmethod(_transactional)  # what wraps any handler of the route (the fast path's too)

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        # Its use case reaches the database (and the cache, the broker): when they are away,
        # ErrorMiddleware answers 503 service_unavailable. Documented by the route itself, so the
        # document says so however the route is mounted.
        kwargs["responses"] = with_codes(kwargs.get("responses"), 503, "service_unavailable")
        super().__init__(path, _resolve_provided(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _transactional(super().get_route_handler())


async def _finish(request: Request, *, ok: bool) -> None:
    reader: AsyncSession | None = request.scope.pop(_READ_SESSION, None)
    session: AsyncSession | None = request.scope.pop(_SESSION, None)
    try:
        if session is None:
            return
        if ok:
            await commit(session, close=True)  # closed even when the commit fails
        else:
            try:
                await rollback(session)
            finally:
                await session.close()
    finally:
        if reader is not None:
            await _close_reader(reader)


async def _close_reader(reader: AsyncSession) -> None:
    """Roll back and release a read session; a replica lost meanwhile can't spoil the answer."""
    try:
        await reader.close()
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        logger.warning("closing a read session failed: {}", type(exc).__name__)
