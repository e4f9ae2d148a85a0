"""One flat route table (``core.edge.routes.add_routes``) and ``Provided`` parameters solved by the route.

Both are optimisations: a client must not be able to tell them from nested ``include_router`` and
FastAPI's own dependency solving (same OpenAPI document, same answers, same names).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from dependency_injector import containers, providers
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Route
from starlette.types import Message, Scope

import main
from core.edge.health import router as health_router
from core.edge.openapi import install_openapi, operation_id
from core.edge.provided import Provided
from core.edge.routes import FlatRoute, TransactionalRoute, add_routes
from core.module import select_modules
from tests.support.settings import make_settings

# --- the app's own route table ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_and_nested() -> tuple[FastAPI, FastAPI]:
    """``main.create_app()`` and the same routers assembled the way it did before: nested."""
    settings = make_settings()
    app = main.create_app(settings)
    nested = FastAPI(title=app.title, version=app.version, summary=app.summary,
                     generate_unique_id_function=operation_id)
    install_openapi(nested, app.state.container.rate_limits())  # the same refinements of the document
    nested.include_router(health_router)
    api = APIRouter(prefix=main.API_PREFIX)
    for module in select_modules(app.state.modules, settings.api_modules, "ATRIUM_API_MODULES"):
        if module.router is not None:
            api.include_router(module.router)
    nested.include_router(api)
    return app, nested


def test_the_app_documents_exactly_what_nested_routers_documented(
    flat_and_nested: tuple[FastAPI, FastAPI],
) -> None:
    app, nested = flat_and_nested

    document = app.openapi()

    assert document == nested.openapi()
    assert "/api/v1/items/{item_id}" in document["paths"]
    assert "/health/ready" in document["paths"]


def test_the_app_holds_its_module_routes_itself(flat_and_nested: tuple[FastAPI, FastAPI]) -> None:
    app, _ = flat_and_nested
    settings = app.state.settings
    served = select_modules(app.state.modules, settings.api_modules, "ATRIUM_API_MODULES")

    assert all(isinstance(route, Route) for route in app.router.routes)  # no nested router to walk
    own = {(route.path, frozenset(route.methods or ())): route for route in app.router.routes
           if isinstance(route, APIRoute)}
    for module in served:
        for route in module.router.routes if module.router is not None else ():
            assert isinstance(route, APIRoute)
            flat = own[(main.API_PREFIX + route.path, frozenset(route.methods))]
            assert type(flat) is type(route)
            assert flat.name == route.name
            assert flat.endpoint is route.endpoint


def test_every_route_is_found_by_its_name_at_the_same_path(flat_and_nested: tuple[FastAPI, FastAPI]) -> None:
    app, nested = flat_and_nested
    routes = [route for route in app.router.routes if isinstance(route, APIRoute)]

    assert len(routes) >= 10
    for route in routes:
        params = {name: "p" for name in route.param_convertors}
        assert app.url_path_for(route.name, **params) == nested.url_path_for(route.name, **params)
        assert app.url_path_for(route.name, **params) == route.path.format(**params)


# --- a small app of our own ---------------------------------------------------------------------------


class Counter:
    ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self.ids)


class Words(containers.DeclarativeContainer):
    nested = providers.Object("from a nested container")


class Container(containers.DeclarativeContainer):
    greeting = providers.Object("hello")
    counter = providers.Factory(Counter)
    words = providers.Container(Words)


Greeting = Annotated[str, Provided("greeting")]
Fresh = Annotated[Counter, Provided("counter")]
Nested = Annotated[str, Provided("words.nested")]


class Note(BaseModel):
    text: str
    stars: int = 0


async def greet(greeting: Greeting) -> dict[str, str]:
    """The provided greeting."""
    return {"greeting": greeting}


async def count(first: Fresh, second: Fresh) -> dict[str, int]:
    return {"first": first.id, "second": second.id}


async def nested_word(word: Nested) -> dict[str, str]:
    return {"word": word}


async def item(item_id: int, greeting: Greeting, request: Request, q: str = "none") -> dict[str, Any]:
    """Path, query, the request itself and a provided value together."""
    return {"item_id": item_id, "q": q, "greeting": greeting, "path": request.url.path,
            "self": str(request.url_for("item", item_id=item_id))}


async def create_note(note: Note, greeting: Greeting, x_tag: Annotated[str | None, Header()] = None) -> Note:
    return Note(text=f"{greeting}: {note.text} [{x_tag}]", stars=note.stars)


def greet_sync(greeting: Greeting) -> dict[str, str]:
    return {"greeting": greeting}


async def shout(greeting: Greeting) -> str:
    return greeting.upper()


async def greet_loudly(loud: Annotated[str, Depends(shout)]) -> dict[str, str]:
    return {"greeting": loud}


ENDPOINTS: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("/greeting", greet, {}),
    ("/count", count, {}),
    ("/nested", nested_word, {}),
    ("/items/{item_id}", item, {"name": "item", "responses": {404: {"description": "not found"}}}),
    ("/notes", create_note, {"methods": ["POST"], "status_code": 201, "response_model": Note}),
    ("/sync", greet_sync, {}),
    ("/loud", greet_loudly, {}),
]


def things_router(route_class: type[APIRoute]) -> APIRouter:
    router = APIRouter(prefix="/things", tags=["things"], route_class=route_class)
    for path, endpoint, options in ENDPOINTS:
        router.add_api_route(path, endpoint, **options)
    return router


def build_app(router: APIRouter, *, flat: bool = True) -> FastAPI:
    app = FastAPI(title="routes", version="1")
    app.state.container = Container()
    app.state.providers = {}
    if flat:
        add_routes(app.router, router, prefix="/api")
    else:
        app.include_router(router, prefix="/api")
    return app


@asynccontextmanager
async def client_of(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(build_app(things_router(TransactionalRoute))) as client:
        yield client


async def test_a_provided_parameter_gets_the_providers_value(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/things/greeting")

    assert response.status_code == 200
    assert response.json() == {"greeting": "hello"}


def test_fastapi_has_no_dependency_to_solve_for_a_provided_parameter() -> None:
    app = build_app(things_router(TransactionalRoute))
    route = next(r for r in app.router.routes if isinstance(r, APIRoute) and r.name == "item")
    plain = build_app(things_router(APIRoute))
    plain_route = next(r for r in plain.router.routes if isinstance(r, APIRoute) and r.name == "item")

    assert [d.name for d in plain_route.dependant.dependencies] == ["greeting"]
    assert route.dependant.dependencies == []


async def test_a_provided_parameter_honours_an_override_on_the_container() -> None:
    app = build_app(things_router(TransactionalRoute))
    async with client_of(app) as client:
        assert (await client.get("/api/things/greeting")).json() == {"greeting": "hello"}
        with app.state.container.greeting.override(providers.Object("bonjour")):
            assert (await client.get("/api/things/greeting")).json() == {"greeting": "bonjour"}
            assert (await client.get("/api/things/loud")).json() == {"greeting": "BONJOUR"}
        assert (await client.get("/api/things/greeting")).json() == {"greeting": "hello"}


async def test_the_provider_is_called_for_every_parameter_of_every_request(client: httpx.AsyncClient) -> None:
    first = (await client.get("/api/things/count")).json()
    second = (await client.get("/api/things/count")).json()

    assert first["first"] != first["second"]
    assert len({first["first"], first["second"], second["first"], second["second"]}) == 4


async def test_a_provider_in_a_nested_container_is_found_by_its_dotted_path(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/things/nested")).json() == {"word": "from a nested container"}


async def test_an_endpoint_with_its_own_request_gets_it_with_the_provided_value(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/things/items/7", params={"q": "search"})

    assert response.status_code == 200
    assert response.json() == {"item_id": 7, "q": "search", "greeting": "hello",
                               "path": "/api/things/items/7", "self": "http://t/api/things/items/7"}


async def test_parameters_next_to_a_provided_one_are_still_validated(client: httpx.AsyncClient) -> None:
    bad_path = await client.get("/api/things/items/not-a-number")
    bad_body = await client.post("/api/things/notes", json={"stars": "many"})
    created = await client.post("/api/things/notes", json={"text": "hi", "stars": 2}, headers={"X-Tag": "t1"})

    assert bad_path.status_code == 422
    assert [e["loc"] for e in bad_path.json()["detail"]] == [["path", "item_id"]]
    assert bad_body.status_code == 422
    assert sorted(tuple(e["loc"]) for e in bad_body.json()["detail"]) == [("body", "stars"), ("body", "text")]
    assert created.status_code == 201
    assert created.json() == {"text": "hello: hi [t1]", "stars": 2}


async def test_sync_endpoints_and_sub_dependencies_still_get_provided_values(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/things/sync")).json() == {"greeting": "hello"}
    assert (await client.get("/api/things/loud")).json() == {"greeting": "HELLO"}


async def test_transactional_routes_answer_and_document_like_plain_routes() -> None:
    """The same endpoints with FastAPI solving ``Provided`` (APIRoute) and with the route doing it."""
    fast = build_app(things_router(TransactionalRoute))
    plain = build_app(things_router(APIRoute))

    # The same document, but that a transactional route declares the 503 of a backing-service outage.
    document = copy.deepcopy(fast.openapi())
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"].pop("503")["x-error-codes"] == ["service_unavailable"]
    assert document == plain.openapi()
    operation = fast.openapi()["paths"]["/api/things/items/{item_id}"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"item_id", "q"}
    requests = [("GET", "/api/things/greeting", None), ("GET", "/api/things/items/3?q=x", None),
                ("GET", "/api/things/items/x", None), ("POST", "/api/things/notes", {"text": "a"}),
                ("POST", "/api/things/notes", {}), ("GET", "/api/things/nested", None)]
    async with client_of(fast) as fast_client, client_of(plain) as plain_client:
        for method, url, body in requests:
            ours = await fast_client.request(method, url, json=body)
            theirs = await plain_client.request(method, url, json=body)
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), url


async def test_a_flat_router_answers_and_documents_like_an_included_one() -> None:
    flat = build_app(things_router(TransactionalRoute))
    nested = build_app(things_router(TransactionalRoute), flat=False)

    assert flat.openapi() == nested.openapi()
    assert flat.url_path_for("item", item_id=5) == "/api/things/items/5"
    assert nested.url_path_for("item", item_id=5) == "/api/things/items/5"
    async with client_of(flat) as flat_client, client_of(nested) as nested_client:
        for url in ("/api/things/greeting", "/api/things/items/5?q=z", "/api/things/missing"):
            ours, theirs = await flat_client.get(url), await nested_client.get(url)
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), url


# --- router options -----------------------------------------------------------------------------------------


async def needs_key(x_key: Annotated[str | None, Header()] = None) -> None:
    if x_key != "sesame":
        raise HTTPException(403, "Wrong key.")


async def secret() -> dict[str, str]:
    """A route behind the router's dependency."""
    return {"secret": "42"}


async def hidden() -> dict[str, bool]:
    return {"hidden": True}


async def old() -> dict[str, bool]:
    return {"old": True}


def guarded_router() -> APIRouter:
    router = APIRouter(prefix="/vault", tags=["vault"], dependencies=[Depends(needs_key)],
                       responses={403: {"description": "wrong key"}}, deprecated=None)
    router.add_api_route("/secret", secret, summary="The secret", response_description="it")
    router.add_api_route("/hidden", hidden, include_in_schema=False)
    router.add_api_route("/old", old, deprecated=True, operation_id="the_old_one")
    return router


async def test_router_dependencies_tags_and_responses_are_kept() -> None:
    flat, nested = FastAPI(), FastAPI()
    add_routes(flat.router, guarded_router(), prefix="/api")
    nested.include_router(guarded_router(), prefix="/api")

    assert flat.openapi() == nested.openapi()
    operation = flat.openapi()["paths"]["/api/vault/secret"]["get"]
    assert operation["tags"] == ["vault"]
    assert "403" in operation["responses"]
    assert "/api/vault/hidden" not in flat.openapi()["paths"]
    async with client_of(flat) as client:
        assert (await client.get("/api/vault/secret")).status_code == 403
        allowed = await client.get("/api/vault/secret", headers={"X-Key": "sesame"})
        assert allowed.json() == {"secret": "42"}
        assert (await client.get("/api/vault/hidden", headers={"X-Key": "sesame"})).status_code == 200


async def test_the_apps_dependency_overrides_apply_to_flat_routes() -> None:
    app = FastAPI()
    add_routes(app.router, guarded_router(), prefix="/api")

    async def open_sesame() -> None:
        return None

    app.dependency_overrides[needs_key] = open_sesame
    async with client_of(app) as client:
        assert (await client.get("/api/vault/secret")).json() == {"secret": "42"}


async def websocket_exchange(app: FastAPI, path: str, text: str) -> list[Message]:
    """Connect to ``path``, send ``text``, disconnect: the ASGI messages the app sent back."""
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": text},
                {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
                    "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
                    "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "subprotocols": []}
    await app(scope, receive, send)
    return sent


async def test_a_router_with_a_websocket_route_is_included_as_it_is() -> None:
    router = APIRouter(prefix="/live")

    @router.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    @router.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("echo: " + await websocket.receive_text())
        await websocket.close()

    app = FastAPI()
    add_routes(app.router, router, prefix="/api")

    async with client_of(app) as client:
        assert (await client.get("/api/live/ping")).json() == {"pong": "yes"}
    sent = await websocket_exchange(app, "/api/live/echo", "hi")
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "echo: hi"
    assert app.url_path_for("ping") == "/api/live/ping"


async def test_a_router_holding_an_included_router_is_included_as_it_is() -> None:
    inner = APIRouter(prefix="/inner", route_class=TransactionalRoute)
    inner.add_api_route("/greeting", greet)
    outer = APIRouter(prefix="/outer")
    outer.include_router(inner)
    outer.add_api_route("/count", count, route_class_override=TransactionalRoute)
    app = build_app(outer)

    async with client_of(app) as client:
        assert (await client.get("/api/outer/inner/greeting")).json() == {"greeting": "hello"}
        assert (await client.get("/api/outer/count")).status_code == 200


async def test_the_lifespan_of_a_flattened_router_still_runs() -> None:
    """``include_router`` runs an included router's lifespan with the app's: flattening must too."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("started")
        yield
        events.append("stopped")

    router = APIRouter(prefix="/with-lifespan", lifespan=lifespan)
    router.add_api_route("/greeting", greet)
    app = build_app(router)

    async with app.router.lifespan_context(app):
        assert events == ["started"]
    assert events == ["started", "stopped"]


# --- matching: a string comparison first (FlatRoute), the same answers ---------------------------


_PATHS = [
    "/api/v1/items", "/api/v1/items/", "/api/v1/items/0197", "/api/v1/items/0197/x", "/api/v1/itemsx",
    "/api/v1/users/me", "/api/v1/users/0197", "/api/v1/invoices/0197/payments", "/api/v1/invoices/0197/void",
    "/api/v1/invoices/0197/voids", "/api/v1/payments/", "/health/live", "/", "/api/v2/items/0197",
]


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize(("root_path", "in_path"), [("", True), ("/atrium", True), ("/atrium", False),
                                                    ("/api", True), ("/api/v1/items", True)])
@pytest.mark.parametrize("dispatched_by", ["own table", "another router", "none"])
def test_flat_routes_match_as_fastapi_routes_do(
    flat_and_nested: tuple[FastAPI, FastAPI], method: str, root_path: str, in_path: bool, dispatched_by: str
) -> None:
    app, _ = flat_and_nested
    routes = [r for r in app.router.routes if isinstance(r, FlatRoute)]
    assert len(routes) > 10
    assert any(not isinstance(r, TransactionalRoute) for r in routes)  # the health routes are flat too
    router = {"own table": app.router, "another router": APIRouter(), "none": None}[dispatched_by]
    for path, route in itertools.product(_PATHS, routes):
        scope = {"type": "http", "method": method, "path": (root_path if in_path else "") + path,
                 "root_path": root_path}
        if router is not None:
            scope["router"] = router
        fast, fast_scope = route.matches(dict(scope))
        full, full_scope = APIRoute.matches(route, dict(scope))
        assert (fast, fast_scope) == (full, full_scope), (method, scope["path"], route.path)


def test_routes_of_its_own_table_are_ruled_out_without_the_full_check(
    flat_and_nested: tuple[FastAPI, FastAPI], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = flat_and_nested
    full_checks: list[str] = []
    original = APIRoute.matches

    def counted(route: APIRoute, scope: Scope) -> Any:
        full_checks.append(route.path)
        return original(route, scope)

    monkeypatch.setattr(APIRoute, "matches", counted)
    path = "/api/v1/items/0197"
    candidates = [r for r in app.router.routes if isinstance(r, FlatRoute)]

    for route in candidates:
        route.matches({"type": "http", "method": "GET", "path": path, "root_path": "", "router": app.router})
    literal_fits = [r.path for r in candidates
                    if r.path == path or ("{" in r.path and path.startswith(r.path.partition("{")[0]))]
    assert full_checks == literal_fits
    assert "/api/v1/items/{item_id}" in full_checks
    assert "/health/live" not in full_checks

    full_checks.clear()
    for route in candidates:  # the same routes, reached through another router: every one in full
        route.matches({"type": "http", "method": "GET", "path": path, "root_path": "", "router": APIRouter()})
    assert full_checks == [r.path for r in candidates]


async def note_by_id(note_id: int) -> dict[str, int]:
    return {"note_id": note_id}


async def test_a_flat_route_still_answers_through_an_included_router_and_a_mount() -> None:
    """A router of flat routes added to one app, then included under a prefix and mounted in
    another: the routes there check in full, so they still answer."""
    inner = APIRouter(route_class=TransactionalRoute)
    inner.add_api_route("/notes/{note_id}", note_by_id, methods=["GET"])
    table = FastAPI()
    add_routes(table.router, inner, prefix="/v1")
    outer = FastAPI()
    outer.include_router(table.router, prefix="/api")
    outer.mount("/mounted", table)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as client:
        assert (await client.get("/api/v1/notes/7")).json() == {"note_id": 7}
        assert (await client.get("/mounted/v1/notes/7")).json() == {"note_id": 7}
        assert (await client.get("/api/v1/notes/x")).status_code == 422
        assert (await client.get("/v1/notes/7")).status_code == 404
