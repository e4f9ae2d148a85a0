"""A method a path lacks is 405 ``method_not_allowed`` whose ``Allow`` names every method of the path.

Starlette answers from the first route whose path matched, with that route's methods only
(``OPTIONS /api/v1/items/{id}`` said ``Allow: GET`` beside PATCH and DELETE); the flat route table
(``core.edge.routes``) names them all. Driven by the app's OpenAPI document, so a new module's
paths are covered without a line here, with the fast path on and off.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from core.edge.error_handlers import install_error_handlers
from core.edge.routes import TransactionalRoute, add_routes
from main import create_app
from tests.support.envelope import assert_envelope
from tests.support.settings import GENEROUS_RATE_LIMITS, make_settings
from tests.support.stack import serve

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PARAMETER = re.compile(r"{([^}:]+)(?::[^}]+)?}")


@pytest.fixture(scope="module", params=["on", "off"])
async def app_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     ) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    path: Path = tmp_path_factory.mktemp("method-not-allowed") / "app.db"
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{path}", fast_path=request.param,
                             **GENEROUS_RATE_LIMITS)
    app = create_app(settings)
    assert app.state.container.fast_path() or request.param == "off"
    async with serve(app) as client:
        yield app, client


def concrete(path: str, operations: dict[str, Any]) -> str:
    """``path`` with each parameter replaced by a value of its documented type."""
    types = {p["name"]: p.get("schema", {}).get("type") for op in operations.values()
             for p in op.get("parameters", ()) if p.get("in") == "path"}
    return PARAMETER.sub(lambda m: "7" if types.get(m.group(1)) == "integer"
                         else "0197a5f0-1c2d-7e3f-8a4b-5c6d7e8f9a0b", path)


async def answers_head(client: httpx.AsyncClient) -> bool:
    """Whether the server answers HEAD where it answers GET (then Allow must name HEAD there too)."""
    return (await client.head("/health/live")).status_code != 405


async def test_every_documented_path_names_all_its_methods_in_a_405(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    assert any("{" in p for p in paths)  # paths with a parameter and without are both covered
    assert any("{" not in p for p in paths)
    head = await answers_head(client)
    checked, wrong = 0, []
    for path, operations in paths.items():
        documented = {method.upper() for method in operations if method.upper() in METHODS}
        expected = documented | ({"HEAD"} if head and "GET" in documented else set())
        url = concrete(path, operations)
        for method in sorted(set(METHODS) - expected):
            response = await client.request(method, url)
            checked += 1
            allow, want = response.headers.get("allow"), ", ".join(sorted(expected))
            if response.status_code != 405 or allow != want:
                wrong.append(f"{method} {url}: {response.status_code} Allow: {allow!r} (want {want!r})")
            elif method != "HEAD":  # a HEAD answer has no body
                assert_envelope(response, 405, "method_not_allowed")
    assert checked > len(paths)
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize(("method", "url", "allow"), [
    ("OPTIONS", "/api/v1/items/0197a5f0-1c2d-7e3f-8a4b-5c6d7e8f9a0b", "DELETE, GET, PATCH"),
    ("PUT", "/api/v1/items", "GET, POST"),
    ("DELETE", "/api/v1/invoices", "GET, POST"),
    ("PATCH", "/api/v1/invoices/0197a5f0-1c2d-7e3f-8a4b-5c6d7e8f9a0b/payments", "GET, POST"),
    ("DELETE", "/api/v1/users/me", "GET"),
])
async def test_the_paths_of_the_issue(app_client: tuple[FastAPI, httpx.AsyncClient],
                                      method: str, url: str, allow: str) -> None:
    _, client = app_client
    response = await client.request(method, url)
    error = assert_envelope(response, 405, "method_not_allowed")
    assert error["message"] == "Method Not Allowed"  # as before: only the header changed
    assert response.headers["allow"] == allow


async def test_a_method_the_path_has_still_answers(app_client: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = app_client
    assert (await client.get("/api/v1/items")).status_code == 200
    assert (await client.get("/api/v1/items/0197a5f0-1c2d-7e3f-8a4b-5c6d7e8f9a0b")).status_code == 404
    assert (await client.delete("/api/v1/items/0197a5f0-1c2d-7e3f-8a4b-5c6d7e8f9a0b")).status_code == 401


async def test_behind_a_root_path_too(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", root_path="/atrium",
                             **GENEROUS_RATE_LIMITS)
    async with serve(create_app(settings)) as client:
        for url in ("/atrium/api/v1/items/1", "/api/v1/items/1"):
            response = await client.request("PUT", url)
            assert_envelope(response, 405, "method_not_allowed")
            assert response.headers["allow"] == "DELETE, GET, PATCH"


# --- the table's rules, on a small app -------------------------------------------------------------


async def me() -> dict[str, str]:
    return {"who": "me"}


async def change(thing_id: str) -> dict[str, str]:
    return {"changed": thing_id}


async def remove(thing_id: str) -> None:
    return None


def things() -> APIRouter:
    router = APIRouter(route_class=TransactionalRoute)
    router.add_api_route("/things/me", me, methods=["GET"])
    router.add_api_route("/things/{thing_id}", change, methods=["PATCH"])
    router.add_api_route("/things/{thing_id}", remove, methods=["DELETE"], status_code=204)
    return router


def small_app(*, flat: bool) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    if flat:
        add_routes(app.router, things(), prefix="/v1")
    else:
        app.include_router(things(), prefix="/v1")
    return app


async def test_templates_that_share_a_path_both_count() -> None:
    """``/things/me`` is also a ``/things/{thing_id}``: PATCH and DELETE serve it, so Allow says so."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app(flat=True)),
                                 base_url="http://t") as client:
        assert (await client.patch("/v1/things/me")).json() == {"changed": "me"}
        response = await client.post("/v1/things/me")
        assert_envelope(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "DELETE, GET, PATCH"
        assert (await client.post("/v1/things/other")).headers["allow"] == "DELETE, PATCH"


async def test_routes_reached_through_an_included_router_answer_as_fastapi_does() -> None:
    """Only the flat table names every method; elsewhere FastAPI's 405 is left as it is."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app(flat=False)),
                                 base_url="http://t") as client:
        response = await client.post("/v1/things/other")
        assert_envelope(response, 405, "method_not_allowed")
        assert response.headers["allow"] in ("PATCH", "DELETE")
