"""The route index (``core.fastpath.route_index``) dispatches every request as the router it stands in for.

Each route table is built twice: one app plain, one with ``install_route_index(app.router)``. The
same request goes to both, and status, headers and body must be equal. The endpoints echo what
handled them (their tag, the route's path template, the path parameters, what the scope says), so a
different pick shows in the body. The indexed app counts the requests its index hands to the
router's own dispatch (``index.fallback``), so a comparison cannot pass merely because the index
stepped aside: a request some route matches fully must be answered by the index itself.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Form, Request, WebSocket
from fastapi.exceptions import FastAPIDeprecationWarning
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

import main
from core.edge.routes import TransactionalRoute, add_routes
from core.fastpath.route_index import RouteIndex, install_route_index
from tests.support.settings import make_settings

with warnings.catch_warnings():
    # Starlette's TestClient (the one client that speaks websockets) warns on import that it wants
    # httpx2; the rest of the suite uses httpx's AsyncClient.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

# --- endpoints that say what handled them ---------------------------------------------------------------


def echo(request: StarletteRequest, tag: str) -> dict[str, Any]:
    """What the endpoint tagged ``tag`` saw of its request, as plain data (comparable across apps)."""
    scope = request.scope
    route = scope.get("route")
    fastapi_scope = scope.get("fastapi", {})
    return {
        "tag": tag,
        "route": getattr(route, "path", None),
        "route_in_table": any(r is route for r in request.app.router.routes),
        "endpoint": getattr(scope.get("endpoint"), "__name__", None),
        "params": {name: str(value) for name, value in scope.get("path_params", {}).items()},
        "router_is_apps": scope.get("router") is request.app.router,
        "path": scope["path"],
        "root_path": scope.get("root_path"),
        "app_root_path": scope.get("app_root_path"),
        "url": str(request.url),
        "fastapi_keys": sorted(fastapi_scope),
        "form_limits": fastapi_scope.get("form_limits"),
        "scope_keys": sorted(scope),
    }


def api_echo(tag: str) -> Callable[..., Any]:
    async def endpoint(request: Request) -> dict[str, Any]:
        return echo(request, tag)

    endpoint.__name__ = tag
    return endpoint


def starlette_echo(tag: str) -> Callable[..., Any]:
    async def endpoint(request: StarletteRequest) -> JSONResponse:
        return JSONResponse(echo(request, tag))

    endpoint.__name__ = tag
    return endpoint


def ws_echo(tag: str) -> Callable[..., Any]:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        route = websocket.scope.get("route")
        await websocket.send_json({"tag": tag, "text": text, "route": getattr(route, "path", None),
                                   "params": dict(websocket.path_params)})
        await websocket.close()

    endpoint.__name__ = tag
    return endpoint


def api(target: APIRouter, path: str, tag: str, *methods: str,
        route_class: type[APIRoute] | None = None, **options: Any) -> None:
    """An echo route tagged ``tag`` at ``path`` (GET unless ``methods`` say otherwise)."""
    if route_class is not None:
        options["route_class_override"] = route_class
    target.add_api_route(path, api_echo(tag), methods=list(methods or ("GET",)), name=tag, **options)


class LooseRoute(APIRoute):
    """Matches its path in any letter case: a route class that decides ``matches`` its own way."""

    def matches(self, scope: Scope) -> Any:
        return super().matches({**scope, "path": scope["path"].lower()})


class LegacyAliasRoute(TransactionalRoute):
    """Also answers the old ``/api/v0/...`` spelling of its path: a ``TransactionalRoute`` (so it
    inherits ``literal_prefix_rule``) whose ``matches`` is its own again."""

    def matches(self, scope: Scope) -> Any:
        path: str = scope["path"]
        if path.startswith("/api/v0/"):
            scope = {**scope, "path": "/api/v1/" + path.removeprefix("/api/v0/")}
        return super().matches(scope)


# --- two apps, one indexed ------------------------------------------------------------------------------


@dataclass
class Pair:
    plain: FastAPI
    indexed: FastAPI
    index: RouteIndex
    fell_back: list[tuple[str, str]] = field(default_factory=list)  # (scope type, path) passed on


def counting_fallback(index: RouteIndex, fell_back: list[tuple[str, str]]) -> None:
    fallback = index.fallback

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        fell_back.append((scope["type"], scope.get("path", "")))
        await fallback(scope, receive, send)

    index.fallback = counted


def pair_of(build: Callable[[], FastAPI]) -> Pair:
    """``build()`` twice; the second app dispatches through an index that counts its fallbacks."""
    plain, indexed = build(), build()
    index = install_route_index(indexed.router)
    assert isinstance(index, RouteIndex)
    assert indexed.router.middleware_stack is index
    pair = Pair(plain, indexed, index)
    counting_fallback(index, pair.fell_back)
    return pair


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def echoed(self) -> Any:
        return httpx.Response(self.status, content=self.body).json()

    def __str__(self) -> str:
        """The status and, for an echo, the route that answered (what a failure should show)."""
        try:
            seen = self.echoed()
        except ValueError:
            return f"{self.status}"
        if not isinstance(seen, dict) or "tag" not in seen:
            return f"{self.status}"
        return f"{self.status} from {seen['tag']!r} ({seen['route']}, {seen['params']})"


async def ask(app: ASGIApp, method: str, url: str, *, root_path: str = "", **options: Any) -> Reply:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.request(method, url, **options)
    return Reply(response.status_code, tuple(response.headers.multi_items()), response.content)


async def compare(pair: Pair, method: str, url: str, *, root_path: str = "",
                  **options: Any) -> tuple[Reply, bool]:
    """The same request to both apps: the (equal) reply, and whether the index answered it itself."""
    before = len(pair.fell_back)
    theirs = await ask(pair.plain, method, url, root_path=root_path, **options)
    ours = await ask(pair.indexed, method, url, root_path=root_path, **options)
    assert ours == theirs, f"{method} {url} (root_path={root_path!r}): plain {theirs}, indexed {ours}"
    return ours, len(pair.fell_back) == before


def assert_case(reply: Reply, handled: bool, expected: bool | None, what: str) -> None:
    """``expected``: the index must answer (True), must leave it to the router (False), or either."""
    if expected is not None:
        assert handled is expected, f"{what}: answered by the index: {handled}, expected {expected}"
    if expected is False:
        # What the router then does is one of its own answers, not a route's.
        assert reply.status in (307, 404, 405), what
        if reply.status == 405:
            assert reply.header("allow"), what
        if reply.status == 307:
            assert reply.header("location"), what


# --- a table like the product's -------------------------------------------------------------------------

RESOURCES = {"items": "item_id", "users": "user_id", "invoices": "invoice_id"}


def product_routes(app: FastAPI) -> None:
    for resource, param in RESOURCES.items():
        base = f"/api/v1/{resource}"
        api(app.router, base, f"list_{resource}", "GET")
        api(app.router, base, f"create_{resource}", "POST")
        if resource == "users":  # one route for several methods, as well as one route per method
            # (Out of the OpenAPI document: one operation id for three operations.)
            api(app.router, base + "/{" + param + "}", "user", "GET", "PATCH", "DELETE",
                include_in_schema=False)
            continue
        for method in ("GET", "PATCH", "DELETE"):
            api(app.router, base + "/{" + param + "}", f"{method.lower()}_{resource}", method)
    api(app.router, "/api/v1/invoices/{invoice_id}/payments", "list_payments", "GET")
    api(app.router, "/api/v1/invoices/{invoice_id}/payments", "pay", "POST")
    api(app.router, "/api/v1/auth/token", "token", "POST")
    api(app.router, "/health/live", "live")
    api(app.router, "/health/ready", "ready")
    app.router.routes.append(Route("/metrics", starlette_echo("metrics")))  # a plain Starlette route


def product_app() -> FastAPI:
    app = FastAPI(title="product")  # with /docs, /redoc, /openapi.json, /docs/oauth2-redirect
    product_routes(app)
    return app


@pytest.fixture(scope="module")
def product() -> Pair:
    return pair_of(product_app)


OWN_REQUESTS = [
    (method, f"/api/v1/{resource}{suffix}")
    for resource in RESOURCES
    for method, suffix in (("GET", ""), ("POST", ""), ("GET", "/7"), ("PATCH", "/7"), ("DELETE", "/7"))
] + [
    ("GET", "/api/v1/invoices/3/payments"), ("POST", "/api/v1/invoices/3/payments"),
    ("POST", "/api/v1/auth/token"), ("GET", "/health/live"), ("GET", "/health/ready"),
    ("GET", "/metrics"), ("HEAD", "/metrics"), ("GET", "/docs"), ("HEAD", "/docs"),
    ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"),
    ("GET", "/api/v1/items/7?q=1&q=2"),
    # Path parameters with odd characters.
    ("GET", "/api/v1/items/a%20b"), ("GET", "/api/v1/items/%C3%A9t%C3%A9"), ("GET", "/api/v1/items/日本"),
    ("GET", "/api/v1/items/%2541"), ("GET", "/api/v1/items/%7Bitem_id%7D"), ("GET", "/api/v1/items/a.b~c;d"),
    ("PATCH", "/api/v1/users/%E2%9C%93"), ("GET", "/api/v1/invoices/x%20y/payments"),
]

WRONG_METHOD = [
    ("PUT", "/api/v1/items"), ("POST", "/api/v1/items/7"), ("PUT", "/api/v1/users/7"),
    ("DELETE", "/api/v1/invoices"), ("DELETE", "/health/live"), ("POST", "/metrics"), ("POST", "/docs"),
    ("PUT", "/api/v1/invoices/3/payments"), ("GET", "/api/v1/auth/token"),
]

UNKNOWN_PATH = [
    "/api/v1/ite", "/api/v1/items/1/extra", "/api/v1/nothing", "/api/v2/items", "/api", "/api/v1", "/",
    "/health", "/metricsx", "/api/v1/items/a%2Fb", "/API/V1/ITEMS", "/api/v1/invoices/3/payments/9",
    "/api/v1/itemsx/7", "/docsx",
]

TRAILING_SLASH = [
    ("GET", "/api/v1/items/"), ("POST", "/api/v1/items/"), ("GET", "/api/v1/items/7/"),
    ("GET", "/health/live/"), ("GET", "/metrics/"), ("GET", "/docs/"), ("DELETE", "/api/v1/users/7/"),
    ("GET", "/api/v1/invoices/3/payments/"), ("GET", "/api/v1/items/%C3%A9/"),
]


@pytest.mark.parametrize(("method", "url"), OWN_REQUESTS)
async def test_each_routes_own_request_is_answered_by_the_index_as_by_the_router(
    product: Pair, method: str, url: str,
) -> None:
    reply, handled = await compare(product, method, url)

    assert_case(reply, handled, True, f"{method} {url}")
    assert reply.status == 200


@pytest.mark.parametrize(("method", "url"), WRONG_METHOD)
async def test_a_wrong_method_is_the_same_405_with_the_same_allow(
    product: Pair, method: str, url: str,
) -> None:
    reply, handled = await compare(product, method, url)

    assert_case(reply, handled, False, f"{method} {url}")
    assert reply.status == 405


@pytest.mark.parametrize("url", UNKNOWN_PATH)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_path_no_route_has_is_the_same_404(product: Pair, method: str, url: str) -> None:
    reply, handled = await compare(product, method, url)

    assert_case(reply, handled, False, f"{method} {url}")
    assert reply.status == 404


@pytest.mark.parametrize(("method", "url"), TRAILING_SLASH)
async def test_a_trailing_slash_is_redirected_to_the_same_location(
    product: Pair, method: str, url: str,
) -> None:
    reply, handled = await compare(product, method, url)

    assert_case(reply, handled, False, f"{method} {url}")
    assert reply.status == 307


async def test_head_on_a_fastapi_get_route_is_answered_as_by_the_router(product: Pair) -> None:
    for url in ("/api/v1/items", "/api/v1/items/7", "/health/live"):
        reply, handled = await compare(product, "HEAD", url)
        get, _ = await compare(product, "GET", url)
        # Answered by the route (the index) exactly when the route takes HEAD, else by the router.
        assert handled is (reply.status == get.status), url


async def test_the_echo_names_the_route_and_its_parameters(product: Pair) -> None:
    """The comparisons above can see a wrong pick: each reply names its route and parameters."""
    item, _ = await compare(product, "GET", "/api/v1/items/%C3%A9t%C3%A9")
    payments, _ = await compare(product, "POST", "/api/v1/invoices/x%20y/payments")

    assert item.echoed()["route"] == "/api/v1/items/{item_id}"
    assert item.echoed()["params"] == {"item_id": "été"}
    assert payments.echoed()["tag"] == "pay"
    assert payments.echoed()["params"] == {"invoice_id": "x y"}


# --- order: two routes that match the same path ---------------------------------------------------------


def order_app(search_first: bool) -> Callable[[], FastAPI]:
    def build() -> FastAPI:
        app = FastAPI()
        routes = [("/api/v1/items/search", "search"), ("/api/v1/items/{item_id}", "item")]
        for path, tag in routes if search_first else routes[::-1]:
            api(app.router, path, tag, "GET")
        # A route that matches partially (wrong method) before one that matches fully.
        api(app.router, "/api/v1/items/search", "search_post", "POST")
        api(app.router, "/api/v1/items/{item_id}", "item_put", "PUT")
        return app

    return build


async def test_two_routes_matching_one_path_are_tried_in_table_order() -> None:
    picked: dict[bool, str] = {}
    for search_first in (True, False):
        pair = pair_of(order_app(search_first))
        for method, url in (("GET", "/api/v1/items/search"), ("GET", "/api/v1/items/5"),
                            ("POST", "/api/v1/items/search"), ("PUT", "/api/v1/items/search"),
                            ("PUT", "/api/v1/items/5")):
            reply, handled = await compare(pair, method, url)
            assert_case(reply, handled, True, f"{method} {url}")
        reply, _ = await compare(pair, "GET", "/api/v1/items/search")
        picked[search_first] = reply.echoed()["tag"]
        reply, handled = await compare(pair, "DELETE", "/api/v1/items/search")
        assert_case(reply, handled, False, "DELETE /api/v1/items/search")

    assert picked[True] != picked[False]  # both routes match: the order decides, in both apps


# --- routes the index cannot file, among filed ones -----------------------------------------------------


def files_app() -> Starlette:
    """A mounted sub-application."""
    return Starlette(routes=[Route("/", starlette_echo("files_root")),
                             Route("/{name}", starlette_echo("files_name"))])


def live_router() -> APIRouter:
    """A router ``core.edge.routes.add_routes`` keeps nested: it holds a websocket route."""
    router = APIRouter()
    api(router, "/status", "live_status", "GET")
    api(router, "/{what}", "live_what", "POST")
    router.add_api_websocket_route("/echo", ws_echo("live_ws"))
    return router


def anywhere_app(static_dir: Path) -> Callable[[], FastAPI]:
    def build() -> FastAPI:
        app = FastAPI()
        api(app.router, "/{section}/v1/items/{item_id}", "section_item", "GET")  # before the filed one
        api(app.router, "/api/v1/items/{item_id}", "item", "GET", "POST")
        api(app.router, "/api/{version}/items/{item_id}", "versioned_item", "GET", "DELETE")
        api(app.router, "/api/v1/orders/{order_id}", "order_read", "GET")
        api(app.router, "/api/v1/orders/{order_id}", "loose_order", "GET", "POST", route_class=LooseRoute)
        api(app.router, "/api/v1/orders/{order_id}", "order_write", "POST", "DELETE")
        app.mount("/api/v1/files", files_app())
        api(app.router, "/api/v1/files", "file_index", "GET")
        api(app.router, "/api/v1/files/{name}", "file_shadowed", "GET")  # the mount answers first
        add_routes(app.router, live_router(), prefix="/api/v1/live")
        api(app.router, "/api/v1/live/{what}", "live_after", "GET")
        app.mount("/static", StaticFiles(directory=static_dir))
        api(app.router, "/api/v1/{kind}", "kind", "GET")
        api(app.router, "/api/v1/{kind}/{item_id}/{rest:path}", "deep", "GET")
        return app

    return build


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("static")
    (directory / "hello.txt").write_text("hello\n")
    return directory


@pytest.fixture(scope="module")
def anywhere(static_dir: Path) -> Pair:
    return pair_of(anywhere_app(static_dir))


ANYWHERE_CASES = [
    ("GET", "/api/v1/items/5", True), ("POST", "/api/v1/items/5", True), ("DELETE", "/api/v1/items/5", True),
    ("PUT", "/api/v1/items/5", False), ("GET", "/api/v2/items/5", True), ("GET", "/web/v1/items/5", True),
    ("GET", "/api/v1/orders/5", True), ("POST", "/api/v1/orders/5", True),
    ("DELETE", "/api/v1/orders/5", True), ("GET", "/API/V1/ORDERS/5", True),
    ("POST", "/Api/V1/Orders/5", True), ("PUT", "/api/v1/orders/5", False),
    ("PUT", "/API/v1/orders/5", False), ("GET", "/api/v1/files", True), ("GET", "/api/v1/files/a.txt", True),
    ("GET", "/api/v1/files/", True), ("GET", "/api/v1/files/a/b", True),
    ("POST", "/api/v1/files/a.txt", True), ("POST", "/api/v1/files", False),
    ("GET", "/api/v1/live/status", True), ("GET", "/api/v1/live/other", True),
    ("POST", "/api/v1/live/other", True), ("PUT", "/api/v1/live/status", False),
    ("GET", "/api/v1/live/status/", True), ("GET", "/static/hello.txt", True),
    ("HEAD", "/static/hello.txt", True), ("GET", "/static/missing.txt", True), ("GET", "/static", False),
    ("GET", "/api/v1/anything", True), ("GET", "/api/v1/items", True), ("GET", "/api/v1/orders", True),
    ("GET", "/api/v1/items/5/a/b", True), ("GET", "/api/v1/", False), ("GET", "/nowhere", False),
    ("GET", "/api/v1/items/5/", True), ("GET", "/api/v1/files/a.txt/", True),
    ("GET", "/api/v2/items/5/", False),
]


@pytest.mark.parametrize(("method", "url", "expected"), ANYWHERE_CASES)
async def test_routes_asked_for_every_path_keep_their_place_in_the_table(
    anywhere: Pair, method: str, url: str, expected: bool,
) -> None:
    reply, handled = await compare(anywhere, method, url)

    assert_case(reply, handled, expected, f"{method} {url}")


async def test_the_unfiled_routes_do_win_where_the_plain_router_lets_them(anywhere: Pair) -> None:
    """The table above is not a table of filed routes answering: these replies come from the others."""
    won = set()
    requests = [("GET", "/api/v1/items/5"), ("DELETE", "/api/v1/items/5"), ("POST", "/api/v1/orders/5"),
                ("GET", "/API/V1/ORDERS/5"), ("GET", "/api/v1/files/a.txt"), ("POST", "/api/v1/live/other"),
                ("GET", "/api/v1/items")]
    for method, url in requests:
        reply, _ = await compare(anywhere, method, url)
        won.add(reply.echoed()["tag"])
    static, _ = await compare(anywhere, "GET", "/static/hello.txt")

    assert not won & {"item", "order_read", "order_write", "file_shadowed", "live_after"}
    assert static.body == b"hello\n"


async def test_a_route_class_with_its_own_matches_is_not_filed(anywhere: Pair) -> None:
    loose = [r for r in anywhere.indexed.router.routes if isinstance(r, LooseRoute)]
    await compare(anywhere, "GET", "/api/v1/orders/5")  # the index is built on a request

    assert loose
    assert anywhere.index._by_key
    for candidates in anywhere.index._by_key.values():  # asked whatever the path
        assert all(route in candidates for route in loose)


async def test_a_path_ending_in_a_newline_gets_the_route_the_plain_router_gives_it(anywhere: Pair) -> None:
    """``%0A`` decodes to a newline, which a route's ``...$`` pattern accepts at the end of the path."""
    for url in ("/api/v1/files%0A", "/api/v1/items/5%0A", "/static/hello.txt%0A"):
        await compare(anywhere, "GET", url)


# --- TransactionalRoute ---------------------------------------------------------------------------------


def things_router(route_class: type[APIRoute] = TransactionalRoute) -> APIRouter:
    router = APIRouter(route_class=route_class)

    async def get_thing(thing_id: int, request: Request) -> dict[str, Any]:
        return {**echo(request, "get_thing"), "thing_id": thing_id}

    api(router, "/things", "list_things", "GET")
    api(router, "/things", "create_thing", "POST")
    api(router, "/things/me", "my_thing", "GET")  # before /things/{thing_id}: order decides
    router.add_api_route("/things/{thing_id}", get_thing, methods=["GET"])
    api(router, "/things/{thing_id}", "patch_thing", "PATCH")
    api(router, "/things/{thing_id}/parts", "thing_parts", "GET")
    api(router, "/thing-kinds/{kind}", "thing_kind", "GET")
    return router


def transactional_app() -> FastAPI:
    app = FastAPI()
    add_routes(app.router, things_router(), prefix="/api/v1")
    api(app.router, "/api/v1/things/{thing_id}", "after_things", "DELETE")
    return app


TRANSACTIONAL_CASES = [
    ("GET", "/api/v1/things", True), ("POST", "/api/v1/things", True), ("GET", "/api/v1/things/me", True),
    ("GET", "/api/v1/things/5", True), ("GET", "/api/v1/things/x", True),
    ("PATCH", "/api/v1/things/me", True), ("DELETE", "/api/v1/things/5", True),
    ("GET", "/api/v1/things/5/parts", True), ("GET", "/api/v1/thing-kinds/big", True),
    ("PUT", "/api/v1/things", False), ("PUT", "/api/v1/things/5", False), ("GET", "/api/v1/things/", False),
    ("GET", "/api/v1/things/5/", False), ("GET", "/api/v1/thing", False),
    ("GET", "/api/v1/things/5/parts/1", False),
]


@pytest.mark.parametrize(("method", "url", "expected"), TRANSACTIONAL_CASES)
async def test_transactional_routes_answer_as_through_the_router(
    method: str, url: str, expected: bool,
) -> None:
    pair = pair_of(transactional_app)
    reply, handled = await compare(pair, method, url)

    assert_case(reply, handled, expected, f"{method} {url}")


async def test_transactional_routes_are_filed_by_their_literal_prefix() -> None:
    pair = pair_of(transactional_app)
    await compare(pair, "GET", "/api/v1/things")
    routes = [r for r in pair.indexed.router.routes if isinstance(r, TransactionalRoute)]

    assert len(routes) >= 5
    for route in routes:
        first_three = "/" + "/".join(route.path.strip("/").split("/")[:3])
        assert route in pair.index._by_key[first_three], route.path
        assert route not in pair.index._anywhere, route.path


def alias_app() -> FastAPI:
    app = FastAPI()
    router = APIRouter(route_class=LegacyAliasRoute)
    api(router, "/things/{thing_id}", "aliased_thing", "GET")
    add_routes(app.router, router, prefix="/api/v1")
    api(app.router, "/api/v0/things/{thing_id}", "legacy_thing", "GET")
    return app


async def test_a_subclass_of_a_literal_prefix_route_that_matches_its_own_way_keeps_its_place() -> None:
    pair = pair_of(alias_app)
    reply, _ = await compare(pair, "GET", "/api/v1/things/5")  # builds the index; the route's own path
    assert reply.echoed()["tag"] == "aliased_thing"

    plain = await ask(pair.plain, "GET", "/api/v0/things/5")
    assert plain.echoed()["tag"] == "aliased_thing"  # the route declared first answers the old path too
    await compare(pair, "GET", "/api/v0/things/5")


# --- root_path ------------------------------------------------------------------------------------------


def rooted_app(root_path: str) -> Callable[[], FastAPI]:
    def build() -> FastAPI:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastAPIDeprecationWarning)  # the product passes it still
            app = FastAPI(root_path=root_path)
        product_routes(app)
        add_routes(app.router, things_router(), prefix="/api/v1")
        app.mount("/api/v1/files", files_app())
        api(app.router, "/", "home")
        return app

    return build


ROOTED_CASES = [
    ("GET", "/prefix/api/v1/items/5", True), ("GET", "/api/v1/items/5", True),
    ("PATCH", "/prefix/api/v1/items/5", True), ("GET", "/prefix/api/v1/things/5", True),
    ("GET", "/api/v1/things/me", True), ("GET", "/prefix/api/v1/things/me", True),
    ("GET", "/prefix/api/v1/files/a.txt", True), ("GET", "/prefix/metrics", True), ("GET", "/prefix/", True),
    ("GET", "/prefix/docs", True), ("GET", "/prefix/openapi.json", True),
    ("GET", "/prefix/health/live", True), ("GET", "/prefix", False),
    ("GET", "/prefixed/api/v1/items/5", False), ("GET", "/prefix/api/v1/items/", False),
    ("GET", "/prefix/nope", False), ("PUT", "/prefix/api/v1/items/5", False),
    ("GET", "/prefix/prefix/api/v1/items/5", False), ("GET", "/prefix/api/v1/things/", False),
]


@pytest.mark.parametrize(("app_root", "server_root"),
                         [("/prefix", ""), ("", "/prefix"), ("/prefix", "/prefix")])
@pytest.mark.parametrize(("method", "url", "expected"), ROOTED_CASES)
async def test_under_a_root_path_the_index_answers_as_the_router(
    app_root: str, server_root: str, method: str, url: str, expected: bool,
) -> None:
    """``server_root``: the root path the server puts in the scope (uvicorn ``--root-path``), with the
    request's path still holding it."""
    pair = pair_of(rooted_app(app_root))
    reply, handled = await compare(pair, method, url, root_path=server_root)

    assert_case(reply, handled, expected, f"{method} {url}")


def test_the_test_clients_root_path_gives_the_same_answers() -> None:
    pair = pair_of(rooted_app(""))
    for url in ("/prefix/api/v1/items/5", "/api/v1/things/5", "/prefix/api/v1/items/", "/prefix/nope"):
        with TestClient(pair.plain, root_path="/prefix") as plain, \
                TestClient(pair.indexed, root_path="/prefix") as indexed:
            theirs, ours = plain.get(url, follow_redirects=False), indexed.get(url, follow_redirects=False)
        assert (ours.status_code, ours.headers.get("location"), ours.content) == (
            theirs.status_code, theirs.headers.get("location"), theirs.content), url


# --- routes added at run time ---------------------------------------------------------------------------


async def test_a_route_added_after_the_first_request_is_found() -> None:
    pair = pair_of(product_app)
    before, handled = await compare(pair, "GET", "/api/v1/late/5")
    assert (before.status, handled) == (404, False)

    for app in (pair.plain, pair.indexed):
        api(app.router, "/api/v1/late/{late_id}", "late", "GET")
    after, handled = await compare(pair, "GET", "/api/v1/late/5")

    assert handled
    assert after.echoed()["tag"] == "late"


async def test_a_route_inserted_first_after_the_first_request_takes_precedence() -> None:
    pair = pair_of(product_app)
    first, _ = await compare(pair, "GET", "/api/v1/items/5")

    for app in (pair.plain, pair.indexed):
        app.router.routes.insert(0, APIRoute("/{section}/v1/items/{item_id}", api_echo("inserted"),
                                             methods=["GET"]))
    after, handled = await compare(pair, "GET", "/api/v1/items/5")

    assert handled
    assert after.echoed()["tag"] != first.echoed()["tag"]


async def test_a_route_added_to_a_nested_router_after_the_first_request_is_found() -> None:
    routers: list[APIRouter] = []

    def build() -> FastAPI:
        app = FastAPI()
        router = live_router()
        routers.append(router)
        add_routes(app.router, router, prefix="/api/v1/live")
        api(app.router, "/api/v1/live/{what}", "live_after", "GET")
        return app

    pair = pair_of(build)
    before, _ = await compare(pair, "GET", "/api/v1/live/later")

    for router in routers:
        api(router, "/later", "later", "GET")
    after, handled = await compare(pair, "GET", "/api/v1/live/later")

    assert handled
    assert after.echoed()["tag"] != before.echoed()["tag"]


async def test_a_route_replaced_in_place_after_the_first_request_is_the_one_used() -> None:
    pair = pair_of(product_app)
    first, _ = await compare(pair, "GET", "/api/v1/items/5")

    for app in (pair.plain, pair.indexed):
        at = next(i for i, r in enumerate(app.router.routes) if getattr(r, "name", None) == "get_items")
        app.router.routes[at] = APIRoute("/api/v1/items/{item_id}", api_echo("get_items_v2"), methods=["GET"])
    after, _ = await compare(pair, "GET", "/api/v1/items/5")

    assert after.echoed()["tag"] != first.echoed()["tag"]


# --- a router with middleware of its own ----------------------------------------------------------------


class Tagging:
    """Middleware on the router itself: stamps each response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-router-mw", b"1")]}
            await send(message)

        await self.app(scope, receive, stamped if scope["type"] == "http" else send)


def tagged_app() -> FastAPI:
    app = product_app()
    app.router.middleware_stack = Tagging(app.router.app)
    return app


async def test_a_router_with_its_own_middleware_gets_no_index() -> None:
    plain, app = tagged_app(), tagged_app()
    stack = app.router.middleware_stack

    assert install_route_index(app.router) is None
    assert app.router.middleware_stack is stack
    for method, url in (("GET", "/api/v1/items/5"), ("PUT", "/api/v1/items"), ("GET", "/nope")):
        ours, theirs = await ask(app, method, url), await ask(plain, method, url)
        assert ours == theirs
    stamped = await ask(app, "GET", "/api/v1/items/5")
    assert stamped.header("x-router-mw") == "1"  # the middleware still runs


async def test_a_router_with_a_body_size_limit_gets_no_index() -> None:
    def build() -> FastAPI:
        app = FastAPI(max_body_size=16)
        api(app.router, "/api/v1/items", "create_items", "POST")
        return app

    plain, app = build(), build()
    stack = app.router.middleware_stack

    assert install_route_index(app.router) is None
    assert app.router.middleware_stack is stack
    for body in (b"x" * 8, b"x" * 64):
        ours = await ask(app, "POST", "/api/v1/items", content=body)
        theirs = await ask(plain, "POST", "/api/v1/items", content=body)
        assert ours == theirs
    assert (await ask(app, "POST", "/api/v1/items", content=b"x" * 64)).status == 413


# --- websockets and lifespan ----------------------------------------------------------------------------


@asynccontextmanager
async def recording_lifespan(app: FastAPI) -> Any:
    app.state.events.append("startup")
    yield
    app.state.events.append("shutdown")


def socket_app() -> FastAPI:
    app = FastAPI(lifespan=recording_lifespan)
    app.state.events = []
    product_routes(app)
    app.router.add_api_websocket_route("/ws/echo", ws_echo("ws_echo"))
    app.router.add_api_websocket_route("/ws/{room}", ws_echo("ws_room"))
    add_routes(app.router, live_router(), prefix="/api/v1/live")
    return app


def ws_exchange(client: TestClient, path: str) -> object:
    try:
        with client.websocket_connect(path) as websocket:
            websocket.send_text("hi")
            return websocket.receive_json()
    except WebSocketDisconnect as exc:
        return ("disconnected", exc.code)


def test_websockets_and_the_lifespan_go_to_the_router() -> None:
    pair = pair_of(socket_app)
    paths = ("/ws/echo", "/ws/lobby", "/api/v1/live/echo", "/ws/nope/deeper", "/api/v1/items")
    answers: dict[str, list[object]] = {}
    for name, app in (("plain", pair.plain), ("indexed", pair.indexed)):
        with TestClient(app) as client:
            answers[name] = [ws_exchange(client, path) for path in paths]
            answers[name].append(client.get("/api/v1/items/7").json())
        answers[name].append(list(app.state.events))

    assert answers["indexed"] == answers["plain"]
    assert answers["plain"][-1] == ["startup", "shutdown"]
    assert [a for a in answers["plain"][:3] if isinstance(a, dict)] == answers["plain"][:3]  # all answered
    assert {kind for kind, _ in pair.fell_back} == {"lifespan", "websocket"}  # the HTTP request: the index


# --- what a matched request's scope holds ---------------------------------------------------------------


async def form_endpoint(request: Request, a: Annotated[str, Form()], b: Annotated[str, Form()] = "",
                        c: Annotated[str, Form()] = "") -> dict[str, Any]:
    return {**echo(request, "form"), "form": [a, b, c]}


def limited_app() -> FastAPI:
    app = FastAPI(form_limits={"max_fields": 2})
    product_routes(app)
    app.router.add_api_route("/api/v1/forms", form_endpoint, methods=["POST"])
    return app


async def test_a_matched_requests_scope_is_the_one_the_router_gives() -> None:
    pair = pair_of(limited_app)
    for method, url in (("GET", "/api/v1/items/7"), ("DELETE", "/api/v1/users/x"), ("GET", "/metrics"),
                        ("GET", "/api/v1/invoices/3/payments")):
        reply, handled = await compare(pair, method, url)
        assert handled
        seen = reply.echoed()
        assert seen["router_is_apps"]
        assert set(seen["params"].values()) <= set(url.split("/"))
        assert seen["form_limits"] is not None
        if seen["tag"] != "metrics":  # a Starlette route puts no route in the scope
            assert seen["route_in_table"]


async def test_the_routers_form_limits_apply_to_a_request_the_index_answers() -> None:
    pair = pair_of(limited_app)
    within, handled = await compare(pair, "POST", "/api/v1/forms", data={"a": "1", "b": "2"})
    assert handled
    over, handled = await compare(pair, "POST", "/api/v1/forms", data={"a": "1", "b": "2", "c": "3"})
    assert handled

    assert within.status == 200
    assert over.status != 200  # the limit is in force, in both apps


# --- the app itself -------------------------------------------------------------------------------------

SAMPLES = {"StringConvertor": "sample-1", "IntegerConvertor": "7", "FloatConvertor": "1.5",
           "UUIDConvertor": str(uuid.UUID(int=7)), "PathConvertor": "a/b"}


def example_path(route: Route) -> str:
    values = {name: SAMPLES[type(convertor).__name__] for name, convertor in route.param_convertors.items()}
    return route.path_format.format(**values)


def http_scope(method: str, path: str) -> Scope:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80)}


async def test_the_apps_index_picks_the_route_its_router_picks() -> None:
    """On ``main.create_app``'s own table: for each route's example path, with its own methods and
    another, the route whose ``handle`` runs is the same through the index as through the router."""
    app = main.create_app(make_settings())
    index = app.router.middleware_stack
    assert isinstance(index, RouteIndex)
    assert index.router is app.router
    fell_back: list[tuple[str, str]] = []
    counting_fallback(index, fell_back)
    picked: list[object] = []

    def recorder(route: object) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            picked.append(route)

        return handle

    for route in app.router.routes:
        route.handle = recorder(route)  # type: ignore[method-assign]

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    async def pick(dispatch: ASGIApp, method: str, path: str) -> object | None:
        picked.clear()
        await dispatch(http_scope(method, path), receive, send)
        assert len(picked) <= 1
        return picked[0] if picked else None

    routes = [r for r in app.router.routes if isinstance(r, Route)]
    assert len(routes) >= 20
    cases = 0
    for route in routes:
        path = example_path(route)
        for method in [*sorted(route.methods or ()), "PUT"]:
            for url in (path, path + "/extra", path + "/"):
                before = len(fell_back)
                ours, theirs = await pick(index, method, url), await pick(app.router.app, method, url)
                assert ours is theirs, f"{method} {url}"
                if url == path and method in (route.methods or ()):
                    assert theirs is not None, f"{method} {url}"
                    assert len(fell_back) == before, f"{method} {url}: the index passed it on"
                cases += 1
    assert cases >= 3 * len(routes)


@pytest.fixture(scope="module")
def real_pair() -> Pair:
    """``main.create_app`` twice, one with its index taken out again (no lifespan: nothing is connected)."""
    settings = make_settings()
    indexed, plain = main.create_app(settings), main.create_app(settings)
    index = indexed.router.middleware_stack
    assert isinstance(index, RouteIndex)
    assert isinstance(plain.router.middleware_stack, RouteIndex)
    plain.router.middleware_stack = plain.router.app
    pair = Pair(plain, indexed, index)
    counting_fallback(index, pair.fell_back)
    return pair


REAL_CASES = [
    ("GET", "/health/live", True), ("GET", "/openapi.json", True), ("GET", "/docs", True),
    ("GET", "/api/v1/users/me", True), ("GET", "/api/v1/items/not-an-id", True),
    ("PUT", "/api/v1/items", False), ("GET", "/api/v1/items/", False), ("DELETE", "/api/v1/invoices", False),
    ("GET", "/nope", False), ("GET", "/api/v1/ite", False), ("GET", "/api/v1/items/1/extra", False),
]


@pytest.mark.parametrize(("method", "url", "expected"), REAL_CASES)
async def test_the_app_answers_through_its_index_as_through_its_router(
    real_pair: Pair, method: str, url: str, expected: bool,
) -> None:
    before = len(real_pair.fell_back)
    theirs = await ask(real_pair.plain, method, url)
    ours = await ask(real_pair.indexed, method, url)
    handled = len(real_pair.fell_back) == before

    assert_case(ours, handled, expected, f"{method} {url}")
    assert (ours.status, ours.body) == (theirs.status, theirs.body)
    for name in ("content-type", "location", "allow", "www-authenticate"):
        assert ours.header(name) == theirs.header(name), name


def test_the_app_installs_its_index_last() -> None:
    """Nothing wraps the router's dispatch after ``create_app`` put the index in."""
    app = main.create_app(make_settings())
    index = app.router.middleware_stack

    assert isinstance(index, RouteIndex)
    assert index.fallback == app.router.app
