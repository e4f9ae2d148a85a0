"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) load everything from the app itself: no CDN, no
other host, behind a ``root_path`` too (core/edge/docs.py). The pages are rendered by a real browser
in tests/deploy/test_docs_browser.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from main import create_app
from tests.support.envelope import assert_envelope
from tests.support.settings import GENEROUS_RATE_LIMITS, make_settings
from tests.support.stack import serve

PAGES = ("/docs", "/redoc")
# Every URL a page names: in src/href attributes, in the script (url: '...', window.location.origin + '...').
URL = re.compile(r"""(?:src|href|spec-url)="([^"]*)"|url: '([^']*)'|origin \+ '([^']*)'""")
ANY_HOST = re.compile(r"(?:https?:)?//[^/\s\"'<>]+", re.IGNORECASE)


@pytest.fixture(scope="module", params=["", "/atrium"], ids=["no root path", "root path"])
async def docs_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      ) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    path: Path = tmp_path_factory.mktemp("docs") / "app.db"
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{path}", root_path=request.param,
                             **GENEROUS_RATE_LIMITS)
    async with serve(create_app(settings)) as client:
        yield request.param, client


def urls(html: str) -> list[str]:
    return [next(group for group in match.groups() if group is not None) for match in URL.finditer(html)]


@pytest.mark.parametrize("page", PAGES)
async def test_a_page_names_no_other_host(docs_client: tuple[str, httpx.AsyncClient], page: str) -> None:
    _, client = docs_client
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert ANY_HOST.findall(html) == []  # no http(s):// nor //host URL at all, in tags or in the script
    assert urls(html), html


@pytest.mark.parametrize("page", PAGES)
async def test_every_url_of_a_page_answers_under_the_root_path(
    docs_client: tuple[str, httpx.AsyncClient], page: str
) -> None:
    root, client = docs_client
    html = (await client.get(page)).text
    found = urls(html)
    assert all(url.startswith(root + "/") for url in found), found
    assert root + "/openapi.json" in found
    assert any(url.endswith("/favicon.png") for url in found)
    for url in found:
        response = await client.get(url)
        assert response.status_code == 200, url
        assert int(response.headers["content-length"]) > 0, url


async def test_the_assets_are_the_uis_own(docs_client: tuple[str, httpx.AsyncClient]) -> None:
    _, client = docs_client
    swagger = await client.get("/docs/static/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in swagger.text[:2000]
    assert swagger.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "Redoc" in (await client.get("/docs/static/redoc.standalone.js")).text[:2000]
    assert (await client.get("/docs/static/swagger-ui.css")).headers["content-type"].startswith("text/css")
    assert (await client.get("/docs/static/favicon.png")).content.startswith(b"\x89PNG")


async def test_an_asset_is_revalidated_not_sent_again(docs_client: tuple[str, httpx.AsyncClient]) -> None:
    _, client = docs_client
    first = await client.get("/docs/static/swagger-ui.css")
    again = await client.get("/docs/static/swagger-ui.css", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize("name", ["missing.js", "__init__.py", "..%2F..%2Fpyproject.toml"])
async def test_nothing_but_the_assets_is_served(
    docs_client: tuple[str, httpx.AsyncClient], name: str
) -> None:
    _, client = docs_client
    assert_envelope(await client.get(f"/docs/static/{name}"), 404, "not_found")


async def test_the_docs_routes_are_not_in_the_openapi_document(
    docs_client: tuple[str, httpx.AsyncClient],
) -> None:
    _, client = docs_client
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]


async def test_the_oauth2_redirect_page_is_served(docs_client: tuple[str, httpx.AsyncClient]) -> None:
    _, client = docs_client
    response = await client.get("/docs/oauth2-redirect")
    assert response.status_code == 200
    assert "oauth2" in response.text.lower()


async def test_a_wrong_method_on_a_page_is_a_405_envelope(docs_client: tuple[str, httpx.AsyncClient]) -> None:
    _, client = docs_client
    response = await client.post("/docs")
    assert_envelope(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"
