"""The lean request handler (``core.fastpath.handler``) answers every request exactly as FastAPI's own does.

Each request goes to two apps built from the same endpoints: one on plain ``APIRoute``, one whose
routes take ``lean_app`` as ``TransactionalRoute`` installs it. Status, headers, body bytes and the
dependencies' calls must be the same, and the lean app must have taken the path expected of it
(its own handler, or FastAPI's for what it does not handle), so no comparison passes by falling back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pytest
from fastapi import (
    BackgroundTasks,
    Body,
    Cookie,
    Depends,
    FastAPI,
    Form,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from core.fastpath.handler import _qualifies, lean_app

CALLS: list[str] = []  # what the dependencies, endpoints and background tasks did, in order
FELL_BACK: list[str] = []  # the paths a lean route passed to FastAPI's own app


class LeanRoute(APIRoute):
    """A route on the lean path, as ``TransactionalRoute`` installs it, noting each fallback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fastapi_app = self.app

        async def generic(scope: Scope, receive: Receive, send: Send) -> None:
            FELL_BACK.append(scope["path"])
            await fastapi_app(scope, receive, send)

        self.generic: ASGIApp = generic
        self.app = lean_app(self, generic)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    price: float = Field(gt=0)
    note: str | None = None


class ItemOut(BaseModel):
    name: str
    price: float
    note: str | None = None


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    colour: str = "any"
    limit: int = Field(10, le=50)


class Paging:
    def __init__(self, page: int = 1) -> None:
        CALLS.append("paging class")
        self.page = page


class Teapot(Exception):
    pass


# --- dependencies, shared by both apps (so that an override of one applies to both) -------------------

oauth2 = OAuth2PasswordBearer(tokenUrl="/token", auto_error=False)


async def dep_b(request: Request) -> str:
    CALLS.append("b")
    return "b"


async def dep_a(b: Annotated[str, Depends(dep_b)]) -> str:
    CALLS.append("a")
    return f"a({b})"


async def fake_b() -> str:
    CALLS.append("fake")
    return "fake"


async def principal(token: Annotated[str | None, Depends(oauth2)]) -> str:
    CALLS.append("principal")
    if token != "good":
        raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return "alice"


async def paging(x_tenant: Annotated[str, Header()],
                 limit: Annotated[int, Query(le=50)] = 10) -> dict[str, Any]:
    CALLS.append("paging")
    return {"tenant": x_tenant, "limit": limit}


async def stamp(response: Response) -> None:
    CALLS.append("stamp")
    response.headers["x-stamp"] = "1"
    response.set_cookie("seen", "yes")
    response.status_code = 202


async def yielding() -> AsyncIterator[str]:
    CALLS.append("open")
    yield "y"
    CALLS.append("close")


def sync_dep() -> str:
    CALLS.append("sync")
    return "sync"


async def scoped_principal(scopes: SecurityScopes, user: Annotated[str, Depends(principal)]) -> str:
    return f"{user}:{scopes.scope_str}"


async def body_size(request: Request) -> int:
    CALLS.append("size")
    return len(await request.body())


def record(what: str) -> None:
    CALLS.append(what)


# --- the two apps -------------------------------------------------------------------------------------


async def invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = [exc.endpoint_file, exc.endpoint_line, exc.endpoint_function, exc.endpoint_path]
    content = {"errors": exc.errors(), "body": exc.body, "where": where}
    return JSONResponse(jsonable_encoder(content), status_code=422)


async def teapot(request: Request, exc: Exception) -> Response:
    """Reads the body: it must be the request the endpoint saw, whose body was already read."""
    return JSONResponse({"detail": str(exc), "body": (await request.body()).decode()}, status_code=418)


def make_app(route_class: type[APIRoute]) -> FastAPI:
    """The same endpoints on ``route_class`` routes."""
    app = FastAPI()
    app.router.route_class = route_class
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Teapot, teapot)

    # Routes the lean path handles.

    @app.get("/items/{item_id}", response_model=None)
    async def read_item(item_id: uuid.UUID, q: Annotated[int, Query(ge=1, le=10)] = 5,
                        tags: Annotated[list[str] | None, Query()] = None) -> Any:
        return {"id": item_id, "q": q, "tags": tags}

    @app.get("/ranged/{n}")
    async def ranged(n: Annotated[int, Path(ge=1, le=100)], flag: bool = False) -> dict[str, int | bool]:
        return {"n": n, "flag": flag}

    @app.get("/headers")
    async def headers(x_token: Annotated[str, Header()], x_count: Annotated[int | None, Header()] = None,
                      session: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
        return {"token": x_token, "count": x_count, "session": session}

    @app.get("/filtered")
    async def filtered(filters: Annotated[Filters, Query()]) -> Filters:
        return filters

    @app.post("/items", status_code=201, response_model=ItemOut)
    async def create_item(item: Item) -> Any:
        CALLS.append("create")
        return item

    @app.post("/items/dict", status_code=201, response_model=ItemOut)
    async def create_from_dict(item: Item) -> Any:
        return {**item.model_dump(), "secret": "never shown"}

    @app.post("/maybe", response_model=None)
    async def maybe(item: Item | None = None) -> Any:
        return {"item": item}

    @app.post("/scalar")
    async def scalar(count: Annotated[int, Body()]) -> dict[str, int]:
        return {"count": count}

    @app.post("/sized")
    async def sized(size: Annotated[int, Depends(body_size)], item: Item) -> dict[str, Any]:
        return {"size": size, "name": item.name}

    @app.get("/chain")
    async def chain(a: Annotated[str, Depends(dep_a)], b: Annotated[str, Depends(dep_b)]) -> dict[str, str]:
        return {"a": a, "b": b}

    @app.get("/chain/uncached")
    async def chain_uncached(a: Annotated[str, Depends(dep_a)],
                             b: Annotated[str, Depends(dep_b, use_cache=False)]) -> dict[str, str]:
        return {"a": a, "b": b}

    @app.post("/secure")
    async def secure(user: Annotated[str, Depends(principal)], item: Item) -> dict[str, Any]:
        return {"user": user, "item": item.model_dump()}

    @app.get("/paged")
    async def paged(page: Annotated[dict[str, Any], Depends(paging)], q: int = 0) -> dict[str, Any]:
        return {**page, "q": q}

    @app.get("/stamped", status_code=201, response_model=ItemOut, dependencies=[Depends(stamp)])
    async def stamped() -> Any:
        return ItemOut(name="n", price=1)

    @app.get("/stamped/dict", response_model=None, dependencies=[Depends(stamp)])
    async def stamped_dict() -> Any:
        return {"plain": True}

    @app.get("/stamped/own", dependencies=[Depends(stamp)])
    async def stamped_own() -> Response:
        return JSONResponse({"own": True}, headers={"x-own": "1"})

    @app.get("/context")
    async def context(request: Request, response: Response,
                      b: Annotated[str, Depends(dep_b)]) -> dict[str, str]:
        response.headers["x-path"] = request.url.path
        response.status_code = 203
        return {"b": b, "method": request.method}

    @app.get("/exclude-none", response_model=ItemOut, response_model_exclude_none=True)
    async def exclude_none() -> Any:
        return ItemOut(name="n", price=2, note=None)

    @app.get("/exclude-unset", response_model=ItemOut, response_model_exclude_unset=True,
             response_model_exclude={"price"})
    async def exclude_unset() -> Any:
        return ItemOut(name="n", price=3)

    @app.get("/raw")
    async def raw() -> Response:
        return Response(b"raw bytes", media_type="text/plain", headers={"x-raw": "1"})

    @app.delete("/items/{item_id}", status_code=204)
    async def delete_item(item_id: int) -> None:
        CALLS.append(f"delete {item_id}")

    @app.get("/invalid-response", response_model=ItemOut)
    async def invalid_response() -> Any:
        return {"name": "n"}

    @app.get("/teapot")
    async def get_teapot() -> None:
        raise Teapot("short and stout")

    @app.post("/teapot")
    async def post_teapot(item: Item) -> None:
        raise Teapot(item.name)

    @app.get("/unhandled")
    async def unhandled() -> None:
        raise LookupError("gone")

    @app.get("/forbidden")
    async def forbidden() -> None:
        raise HTTPException(403, "no", headers={"x-why": "because"})

    # Routes the lean path leaves to FastAPI.

    @app.get("/yield")
    async def with_yield(y: Annotated[str, Depends(yielding)]) -> dict[str, str]:
        CALLS.append("endpoint")
        return {"y": y}

    @app.get("/sync-dep")
    async def with_sync_dep(s: Annotated[str, Depends(sync_dep)]) -> dict[str, str]:
        return {"s": s}

    @app.get("/class-dep")
    async def with_class_dep(paging: Annotated[Paging, Depends()]) -> dict[str, int]:
        return {"page": paging.page}

    @app.get("/sync-endpoint")
    def sync_endpoint(q: int = 1) -> dict[str, int]:
        return {"q": q}

    @app.post("/form")
    async def form(name: Annotated[str, Form()]) -> dict[str, str]:
        return {"name": name}

    @app.post("/background")
    async def background(tasks: BackgroundTasks, item: Item) -> dict[str, str]:
        tasks.add_task(record, f"task {item.name}")
        return {"queued": item.name}

    @app.get("/html", response_class=HTMLResponse)
    async def html() -> str:
        return "<p>hi</p>"

    @app.post("/embedded")
    async def embedded(item: Annotated[Item, Body(embed=True)]) -> dict[str, str]:
        return {"name": item.name}

    @app.get("/scoped")
    async def scoped(
        user: Annotated[str, Security(scoped_principal, scopes=["items:read"])],
    ) -> dict[str, str]:
        return {"user": user}

    @app.post("/limited", max_body_size=64)
    async def limited(item: Item) -> dict[str, str]:
        return {"name": item.name}

    @app.get("/mixed-scope")
    async def mixed_scope(a: Annotated[str, Depends(dep_b, scope="request")],
                          b: Annotated[str, Depends(dep_b)]) -> dict[str, str]:
        return {"a": a, "b": b}

    async def lenient(item: Item) -> dict[str, str]:
        return {"name": item.name}

    app.router.add_api_route("/lenient", lenient, methods=["POST"], strict_content_type=False)
    return app


LEAN_ROUTES = ["/items/{item_id}", "/ranged/{n}", "/headers", "/filtered", "/items", "/items/dict", "/maybe",
               "/scalar", "/sized", "/chain", "/chain/uncached", "/secure", "/paged", "/stamped",
               "/stamped/dict", "/stamped/own", "/context", "/exclude-none", "/exclude-unset", "/raw",
               "/invalid-response", "/teapot", "/unhandled", "/forbidden"]
GENERIC_ROUTES = ["/yield", "/sync-dep", "/class-dep", "/sync-endpoint", "/form", "/background", "/html",
                  "/embedded", "/scoped", "/limited", "/mixed-scope", "/lenient"]


@dataclass(frozen=True)
class Apps:
    plain: FastAPI
    lean: FastAPI


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    calls: list[str]

    def json(self) -> Any:
        return httpx.Response(self.status, content=self.body).json()


@pytest.fixture(scope="module")
def apps() -> Apps:
    return Apps(plain=make_app(APIRoute), lean=make_app(LeanRoute))


@pytest.fixture(autouse=True)
def clean_log() -> Iterator[None]:
    yield
    CALLS.clear()
    FELL_BACK.clear()


async def answer(app: FastAPI, method: str, url: str, **options: Any) -> tuple[Answer, bool]:
    """``app``'s answer, and whether a lean route passed the request to FastAPI's app."""
    CALLS.clear()
    FELL_BACK.clear()
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
                asyncio.timeout(5)):  # a body read twice would wait for the client forever
        response = await client.request(method, url, **options)
    found = Answer(response.status_code, response.headers.multi_items(), response.content, list(CALLS))
    return found, bool(FELL_BACK)


async def both(apps: Apps, method: str, url: str, *, lean: bool = True, **options: Any) -> Answer:
    """The one answer both apps give; the lean app took its own path if ``lean``, else FastAPI's."""
    expected, _ = await answer(apps.plain, method, url, **options)
    got, fell_back = await answer(apps.lean, method, url, **options)
    assert got == expected
    assert fell_back is not lean
    return got


# --- which routes take the lean path -----------------------------------------------------------------


def routes_at(app: FastAPI, path: str) -> list[LeanRoute]:
    found = [route for route in app.routes if isinstance(route, LeanRoute) and route.path == path]
    assert found, path
    return found


def test_the_ordinary_routes_take_the_lean_handler(apps: Apps) -> None:
    for path in LEAN_ROUTES:
        for route in routes_at(apps.lean, path):
            assert _qualifies(route), path
            assert route.app is not route.generic, path


def test_routes_with_what_the_lean_handler_does_not_do_keep_fastapis(apps: Apps) -> None:
    """A yield, sync or class dependency, a sync endpoint, a form, background tasks, a response class,
    an embedded body, security scopes, a body size limit, a dependency scope, lenient content types."""
    for path in GENERIC_ROUTES:
        for route in routes_at(apps.lean, path):
            assert not _qualifies(route), path
            assert route.app is route.generic, path


# --- parameters ----------------------------------------------------------------------------------------

ITEM_ID = "0b6f2a8e-8d4f-4c1e-9a57-2f0b3c4d5e6f"


@pytest.mark.parametrize(("url", "status"), [
    (f"/items/{ITEM_ID}", 200),
    (f"/items/{ITEM_ID}?q=10&tags=a&tags=b", 200),
    ("/items/not-a-uuid", 422),
    (f"/items/{ITEM_ID}?q=0", 422),
    (f"/items/{ITEM_ID}?q=11", 422),
    (f"/items/{ITEM_ID}?q=ten", 422),
    ("/items/not-a-uuid?q=ten", 422),
    ("/ranged/1", 200),
    ("/ranged/100?flag=yes", 200),
    ("/ranged/0", 422),
    ("/ranged/101", 422),
    ("/ranged/x?flag=maybe", 422),
    ("/nowhere", 404),
])
async def test_path_and_query_parameters(apps: Apps, url: str, status: int) -> None:
    got = await both(apps, "GET", url)

    assert got.status == status


@pytest.mark.parametrize(("url", "status"), [
    ("/filtered", 200),
    ("/filtered?colour=red&limit=50", 200),
    ("/filtered?limit=51&size=9", 422),
])
async def test_a_query_parameter_model(apps: Apps, url: str, status: int) -> None:
    got = await both(apps, "GET", url)

    assert got.status == status


@pytest.mark.parametrize(("headers", "status"), [
    ({"x-token": "t"}, 200),
    ({"x-token": "t", "x-count": "3", "cookie": "session=s1"}, 200),
    ({}, 422),
    ({"x-count": "many", "cookie": "session=s1"}, 422),
])
async def test_header_and_cookie_parameters(apps: Apps, headers: dict[str, str], status: int) -> None:
    got = await both(apps, "GET", "/headers", headers=headers)

    assert got.status == status


# --- the JSON body -------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(("content", "headers", "status", "lean"), [
    (b'{"name": "pen", "price": 1.5}', JSON, 201, True),
    (b'{"name": "pen", "price": 1.5, "note": "blue"}', {"content-type": "application/json; charset=utf-8"},
     201, True),
    (b'{"name": "pen", "price": 1.5}', {"content-type": "application/json;charset=utf-8"}, 201, True),
    (b'{"name": "pen", "price": "x"}', JSON, 422, True),
    (b'{"name": 7, "price": -1}', JSON, 422, True),
    (b'{"name": "pen", "price": 1, "colour": "red"}', JSON, 422, True),
    (b'{"name": "pen", "price": }', JSON, 422, True),
    (b'{"name": "pen"', JSON, 422, True),
    (b"", JSON, 422, True),
    (b"null", JSON, 422, True),
    (b"[1, 2]", JSON, 422, True),
    (b'"pen"', JSON, 422, True),
    (b'{"name": "pen", "price": 1.5}', {}, 422, True),  # no content type: FastAPI is strict
    (b"", {}, 422, True),
    (b'{"name": "pen", "price": 1.5}', {"content-type": "text/plain"}, 422, False),
    (b'{"name": "pen", "price": 1.5}', {"content-type": "application/merge-patch+json"}, 201, False),
    (b'{"name": "pen", "price": 1.5}', {"content-type": "application/json; charset=latin-1"}, 201, False),
    (b'{"name": "pen", "price": 1.5}', {"content-type": "Application/JSON"}, 201, False),
    (b'{"name": "pen", "price": 1.5}', {"content-type": ""}, 422, False),
    (b"name=pen&price=1.5", {"content-type": "application/x-www-form-urlencoded"}, 422, False),
    (b'{"name": "\xff", "price": 1}', JSON, 400, True),  # not UTF-8
    (b"[" * 100_000, JSON, 400, True),  # nested too deep for the parser
])
async def test_a_json_body(apps: Apps, content: bytes, headers: dict[str, str], status: int,
                           lean: bool) -> None:
    got = await both(apps, "POST", "/items", content=content, headers=headers, lean=lean)

    assert got.status == status
    assert got.calls == (["create"] if status == 201 else [])


@pytest.mark.parametrize(("content", "status"), [(b"5", 200), (b'"5"', 200), (b'"five"', 422), (b"", 422)])
async def test_a_single_value_body(apps: Apps, content: bytes, status: int) -> None:
    got = await both(apps, "POST", "/scalar", content=content, headers=JSON)

    assert got.status == status


async def test_invalid_json_is_a_json_invalid_error(apps: Apps) -> None:
    got = await both(apps, "POST", "/items", content=b'{"name": ', headers=JSON)

    assert [error["type"] for error in got.json()["errors"]] == ["json_invalid"]


@pytest.mark.parametrize(("content", "status"), [
    (b"null", 200),
    (b"", 200),
    (b'{"name": "pen", "price": 2}', 200),
    (b'{"name": "pen"}', 422),
])
async def test_an_optional_body(apps: Apps, content: bytes, status: int) -> None:
    got = await both(apps, "POST", "/maybe", content=content, headers=JSON)

    assert got.status == status


async def test_a_body_read_again_by_a_dependency(apps: Apps) -> None:
    got = await both(apps, "POST", "/sized", content=b'{"name": "pen", "price": 1}', headers=JSON)

    assert got.json() == {"size": 27, "name": "pen"}


class Chunked:
    """A body sent in chunks, without a content length (so only reading it finds it too large)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_a_body_over_a_middlewares_size_limit() -> None:
    """Starlette's limit raises an HTTPException while the body is read: a 413, not a parse error."""
    apps = Apps(plain=make_app(APIRoute), lean=make_app(LeanRoute))
    for app in (apps.plain, apps.lean):
        app.add_middleware(RequestBodyLimitMiddleware, max_body_size=32)

    small = await both(apps, "POST", "/items", content=Chunked(b'{"name": "pen", ', b'"price": 1}'),
                       headers=JSON)
    large = await both(apps, "POST", "/items", content=Chunked(b'{"name": "pen", ', b'"price": 1, "x": 1}'),
                       headers=JSON)

    assert (small.status, large.status) == (201, 413)
    assert large.json() == {"detail": "Content Too Large"}


async def test_a_body_read_by_the_exception_handler_is_the_one_the_endpoint_read(apps: Apps) -> None:
    got = await both(apps, "POST", "/teapot", json={"name": "kettle", "price": 3})

    assert got.status == 418
    assert got.json() == {"detail": "kettle", "body": '{"name":"kettle","price":3}'}


# --- dependencies -------------------------------------------------------------------------------------


async def test_a_dependency_used_twice_is_called_once(apps: Apps) -> None:
    got = await both(apps, "GET", "/chain")

    assert got.json() == {"a": "a(b)", "b": "b"}
    assert got.calls == ["b", "a"]


async def test_a_dependency_without_the_cache_is_called_again(apps: Apps) -> None:
    got = await both(apps, "GET", "/chain/uncached")

    assert got.calls == ["b", "a", "b"]


async def test_the_same_dependency_in_two_scopes_is_called_in_each(apps: Apps) -> None:
    got = await both(apps, "GET", "/mixed-scope", lean=False)

    assert got.calls == ["b", "b"]


@pytest.mark.parametrize(("content", "headers", "status"), [
    (b'{"name": "pen", "price": 1}', {}, 401),
    (b'{"name": "pen", "price": -1}', {}, 401),  # unauthenticated before invalid
    (b"", {}, 401),
    (b'{"name": "pen", "price": -1}', {"authorization": "Bearer good"}, 422),
    (b'{"name": "pen", "price": 1}', {"authorization": "Bearer good"}, 200),
    (b'{"name": "pen", "price": 1}', {"authorization": "Bearer bad"}, 401),
    (b'{"name": "pen", "price": 1}', {"authorization": "Basic good"}, 401),
    (b'{"name": ', {}, 422),  # the body is parsed before any dependency runs
])
async def test_an_authenticating_dependency(apps: Apps, content: bytes, headers: dict[str, str],
                                            status: int) -> None:
    got = await both(apps, "POST", "/secure", content=content, headers={**JSON, **headers})

    assert got.status == status


@pytest.mark.parametrize(("url", "headers", "status"), [
    ("/paged", {"x-tenant": "t1"}, 200),
    ("/paged?limit=50&q=2", {"x-tenant": "t1"}, 200),
    ("/paged?limit=51", {"x-tenant": "t1"}, 422),
    ("/paged?limit=51&q=x", {}, 422),  # the dependency's errors, then the endpoint's
])
async def test_a_dependencys_own_parameters(apps: Apps, url: str, headers: dict[str, str],
                                            status: int) -> None:
    got = await both(apps, "GET", url, headers=headers)

    assert got.status == status
    assert got.calls == (["paging"] if status == 200 else [])


async def test_request_and_response_parameters(apps: Apps) -> None:
    got = await both(apps, "GET", "/context")

    assert got.status == 203
    assert ("x-path", "/context") in got.headers


@pytest.mark.parametrize(("url", "status"), [
    ("/stamped", 202),
    ("/stamped/dict", 202),
    ("/stamped/own", 200),
])
async def test_a_dependency_setting_the_status_and_headers(apps: Apps, url: str, status: int) -> None:
    """Merged into the response the route makes; not into one the endpoint returns itself."""
    got = await both(apps, "GET", url)

    assert got.status == status
    assert (("x-stamp", "1") in got.headers) is (url != "/stamped/own")


async def test_an_override_is_honoured_and_its_removal_goes_back_to_the_lean_handler() -> None:
    apps = Apps(plain=make_app(APIRoute), lean=make_app(LeanRoute))
    apps.plain.dependency_overrides[dep_b] = fake_b
    apps.lean.dependency_overrides[dep_b] = fake_b

    overridden = await both(apps, "GET", "/chain", lean=False)
    apps.plain.dependency_overrides.clear()
    apps.lean.dependency_overrides.clear()
    restored = await both(apps, "GET", "/chain")

    assert overridden.json() == {"a": "a(fake)", "b": "fake"}
    assert restored.json() == {"a": "a(b)", "b": "b"}


# --- the response ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "url", "status"), [
    ("POST", "/items/dict", 201),
    ("GET", "/exclude-none", 200),
    ("GET", "/exclude-unset", 200),
    ("GET", "/raw", 200),
    ("DELETE", "/items/3", 204),
    ("DELETE", "/items/three", 422),
    ("GET", "/forbidden", 403),
    ("GET", "/teapot", 418),
    ("PUT", "/items", 405),
])
async def test_responses(apps: Apps, method: str, url: str, status: int) -> None:
    body = {"json": {"name": "pen", "price": 1}} if method == "POST" else {}

    got = await both(apps, method, url, **body)

    assert got.status == status


async def test_a_response_that_violates_the_response_model_fails_alike(apps: Apps) -> None:
    failures = []
    for app in (apps.plain, apps.lean):
        with pytest.raises(ResponseValidationError) as failure:
            await answer(app, "GET", "/invalid-response")
        failures.append(failure.value)

    plain, lean = failures
    assert lean.errors() == plain.errors()
    assert lean.body == plain.body
    assert str(lean) == str(plain)  # the endpoint's file, line, function and path included
    assert not FELL_BACK


async def test_an_exception_without_a_handler_propagates_alike(apps: Apps) -> None:
    for app in (apps.plain, apps.lean):
        with pytest.raises(LookupError, match="gone"):
            await answer(app, "GET", "/unhandled")

    assert not FELL_BACK


async def test_a_mounted_app_reports_the_mount_path() -> None:
    apps = Apps(plain=FastAPI(), lean=FastAPI())
    apps.plain.mount("/v1", make_app(APIRoute))
    apps.lean.mount("/v1", make_app(LeanRoute))

    got = await both(apps, "GET", f"/v1/items/{ITEM_ID}?q=0")

    assert got.json()["where"][2:] == ["read_item", "GET /v1/items/{item_id}"]


# --- routes left to FastAPI -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "url", "options", "calls"), [
    ("GET", "/yield", {}, ["open", "endpoint", "close"]),
    ("GET", "/sync-dep", {}, ["sync"]),
    ("GET", "/class-dep?page=2", {}, ["paging class"]),
    ("GET", "/sync-endpoint?q=4", {}, []),
    ("POST", "/form", {"data": {"name": "pen"}}, []),
    ("POST", "/background", {"json": {"name": "pen", "price": 1}}, ["task pen"]),
    ("POST", "/background", {"json": {"name": "pen"}}, []),
    ("GET", "/html", {}, []),
    ("POST", "/embedded", {"json": {"item": {"name": "pen", "price": 1}}}, []),
    ("GET", "/scoped", {"headers": {"authorization": "Bearer good"}}, ["principal"]),
    ("POST", "/limited", {"json": {"name": "pen", "price": 1}}, []),
    ("POST", "/limited", {"json": {"name": "pen" * 30, "price": 1}}, []),
    ("POST", "/lenient", {"content": b'{"name": "pen", "price": 1}'}, []),
])
async def test_routes_left_to_fastapi(apps: Apps, method: str, url: str, options: dict[str, Any],
                                      calls: list[str]) -> None:
    got = await both(apps, method, url, lean=False, **options)

    assert got.status < 500
    assert got.calls == calls
