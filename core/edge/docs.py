"""The API's documentation pages, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, served offline.

FastAPI's own pages load their scripts, styles and icon from a CDN: a blank page on a machine
without internet access. Here they come from the ``fastapi-offline`` distribution (its ``static``
folder holds Swagger UI's ``swagger-ui-bundle.js`` and ``swagger-ui.css``, ReDoc's
``redoc.standalone.js`` and FastAPI's ``favicon.png``), served by the app under ``/docs/static/``;
the pages themselves are FastAPI's (``get_swagger_ui_html``, ``get_redoc_html``) pointed at those
files. Nothing on them names another host: no web fonts, no Swagger validator badge.

The pages are flat routes of the app's table (``core.edge.routes``) under FastAPI's own names
(``swagger_ui_html``, ``swagger_ui_redirect``, ``redoc_html``), the files one plain route
(``docs_static``); none is in the OpenAPI document, and every URL follows the app's ``root_path``.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from core.edge.routes import FlatRoute, add_routes

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
STATIC_URL = DOCS_URL + "/static"
ASSETS_PACKAGE = ("fastapi_offline", "static")  # (distribution's package, its folder of files)


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets from ``app`` itself (the app's ``docs_url`` and
    ``redoc_url`` are None, so FastAPI adds no CDN pages of its own)."""
    openapi_url = app.openapi_url
    if not openapi_url:
        return  # no document, nothing to show
    redirect_url = app.swagger_ui_oauth2_redirect_url
    router = APIRouter(route_class=FlatRoute, include_in_schema=False)

    @router.get(DOCS_URL)
    async def swagger_ui_html(request: Request) -> Response:
        """Swagger UI, its assets served by the app."""
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            # validatorUrl: Swagger UI would show a badge fetched from swagger.io's online validator.
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
        )

    if redirect_url:
        @router.get(redirect_url)
        async def swagger_ui_redirect() -> Response:
            """Where an OAuth2 sign-in started from Swagger UI comes back to."""
            return get_swagger_ui_oauth2_redirect_html()

    @router.get(REDOC_URL)
    async def redoc_html(request: Request) -> Response:
        """ReDoc, its script served by the app."""
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

    add_routes(app.router, router)

    assets = StaticFiles(packages=[ASSETS_PACKAGE])  # fails here, at start, if the package is missing

    async def docs_static(request: Request) -> Response:
        """A file of the pages, with ETag and Last-Modified (a browser revalidates: 304)."""
        # StaticFiles keeps the name inside the package's folder (anything else is a 404).
        return await assets.get_response(request.path_params["name"], request.scope)

    # A plain route (GET and HEAD), as FastAPI's own document and pages are; not a mount, so the
    # table stays one list of routes (tests/unit/test_routes.py).
    app.add_route(STATIC_URL + "/{name}", docs_static, methods=["GET"], include_in_schema=False)


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")
