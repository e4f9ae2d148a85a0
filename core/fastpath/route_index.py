"""An index over the app's route table: a request tries only the routes that can match its path.

FastAPI's router asks every route in turn whether it matches, and each answer is a method call (a
regex for Starlette's routes, a route-context lookup for FastAPI's): ``GET /api/v1/items/{id}``
asked thirteen routes before its own, about 8% of a cached read (bench/README.md). The index files
each route under the first three segments of its path when its literal part (up to the first
parameter) fixes them, so ``/api/v1/items/123`` asks the five item routes, in table order.

A route whose literal part is shorter (``/{page}``, ``/api/v{version}/...``), and anything that
is not a plain route (a mount, an included router, a host), is asked for every path, in its
place. The first route to match fully gets the request exactly as from the router (same scope
updates, same telemetry); a request no candidate matches fully (a 404, a 405, a slash redirect,
a low-priority route) is left to the router's own dispatch, which decides as before. The index is
rebuilt when the table changes (a route added, removed or replaced at run time).
"""

from __future__ import annotations

import operator

from fastapi.routing import APIRoute, APIRouter, _apply_router_form_limits, _update_scope
from fastapi.telemetry._api import _route_selected  # what fastapi.routing imports and calls
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

_SEGMENTS = 3  # the key: a path's first three segments ("/api/v1/items")


def _key(path: str) -> str:
    return "/".join(path.split("/", _SEGMENTS + 1)[: _SEGMENTS + 1])


def _route_key(route: object) -> str | None:
    """The key every path this route can match has, or None if it is not fixed (ask it always)."""
    if not isinstance(route, Route):
        return None  # a mount, an included router, a host, a websocket route
    # The class whose matches() runs must be a plain route's, or one that declares it keeps their
    # rule (core.edge.routes.TransactionalRoute); a subclass deciding its own way is asked always.
    owner = next(c for c in type(route).__mro__ if "matches" in c.__dict__)
    if owner not in (Route, APIRoute) and not owner.__dict__.get("literal_prefix_rule", False):
        return None
    literal, brace, _ = route.path.partition("{")
    if not brace or literal.count("/") > _SEGMENTS:
        return _key(literal)  # a literal path, or one whose first segments are all literal
    return None


class RouteIndex:
    """``router.middleware_stack`` replaced: dispatch by the index, the router's own otherwise."""

    def __init__(self, router: APIRouter) -> None:
        self.router = router
        self.fallback: ASGIApp = router.middleware_stack
        self._snapshot: list[BaseRoute] = []  # the table the index was built from
        self._by_key: dict[str, tuple[BaseRoute, ...]] = {}
        self._anywhere: tuple[BaseRoute, ...] = ()

    def _rebuild(self) -> None:
        routes = list(self.router.routes)
        keys = [_route_key(route) for route in routes]
        # Each key's candidates are its own routes and the unfixed ones, in table order.
        self._by_key = {
            key: tuple(r for r, k in zip(routes, keys, strict=True) if k is None or k == key)
            for key in {k for k in keys if k is not None}
        }
        self._anywhere = tuple(r for r, k in zip(routes, keys, strict=True) if k is None)
        self._snapshot = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = self.router
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        routes = router.routes
        if len(routes) != len(self._snapshot) or not all(map(operator.is_, routes, self._snapshot)):
            self._rebuild()  # a route added, removed or replaced since
        path = get_route_path(scope)
        if path.endswith("\n"):
            # A route's regex accepts one trailing newline ("$" matches before it), which the key
            # would not: such a path is the router's to dispatch.
            await self.fallback(scope, receive, send)
            return
        for route in self._by_key.get(_key(path), self._anywhere):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                # What the router does with a full match (fastapi.routing.APIRouter.app).
                _apply_router_form_limits(scope, router.form_limits)
                scope.setdefault("router", router)
                _update_scope(scope, child_scope)
                _route_selected(scope=scope, path=getattr(route, "path_format", None),
                                mount=isinstance(route, Mount))
                await route.handle(scope, receive, send)
                return
        await self.fallback(scope, receive, send)


def install_route_index(router: APIRouter) -> RouteIndex | None:
    """Dispatch ``router``'s HTTP requests through a ``RouteIndex``; not for a router with middleware
    of its own (the index would bypass it)."""
    if router.middleware_stack != router.app:
        return None
    index = RouteIndex(router)
    router.middleware_stack = index
    return index
