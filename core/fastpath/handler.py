"""The fast path's request handler for the common shape of route, with FastAPI's own behind it.

FastAPI handles every request with machinery sized for every feature it has: two
``AsyncExitStack`` per request (for dependencies with ``yield``), a generic dependency solver that
re-derives cache keys and scopes for each dependency on every call, a content type parsed with
``email.message``, a route-level exception wrapper. On this app's routes that was about a fifth
of a ``POST /items`` and a tenth of a cached read (bench/README.md).

``lean_app(route)`` returns an ASGI app for ``route`` that does the same work directly when the
route qualifies (see ``_qualifies``) and the request is the ordinary case (a JSON body sent as
``application/json``, no dependency overrides installed); anything else is passed, untouched, to
FastAPI's own app for the route. Validation is FastAPI's own (``request_params_to_args``,
``request_body_to_args``, the route's response field), so errors, defaults and the bytes
produced are the same; tests/unit/test_lean_route.py compares the two request by request.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi._body_limit import get_body_limit_error
from fastapi._compat import Undefined
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.routing import APIRoute, APIRouter, _extract_endpoint_context
from fastapi.utils import is_body_allowed_for_status_code
from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

_JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8",
                         b"application/json;charset=utf-8", b"application/json; charset=UTF-8"})
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _is_async(call: Any) -> bool:
    if inspect.isclass(call):
        return False
    if inspect.iscoroutinefunction(call):
        return True
    dunder = getattr(call, "__call__", None)  # noqa: B004  # a callable instance (OAuth2PasswordBearer)
    return inspect.iscoroutinefunction(dunder) and not inspect.isasyncgenfunction(dunder)


def _plain(dependant: Dependant, *, top: bool) -> bool:
    """Only what the lean path knows how to solve: async calls, no yield, no scopes."""
    if (dependant.websocket_param_name or dependant.background_tasks_param_name
            or dependant.security_scopes_param_name or dependant.own_oauth_scopes
            or dependant.parent_oauth_scopes or dependant.concurrency is not None):
        return False
    if dependant.body_params and not top:
        return False
    if not top and dependant.scope is not None:  # FastAPI caches per call *and* scope; _solve per call
        return False
    if not top and not _is_async(dependant.call):
        return False
    return all(_plain(sub, top=False) for sub in dependant.dependencies)


def _qualifies(route: APIRoute) -> bool:
    response_class = route.response_class
    strict = route.strict_content_type
    return (
        (strict.value if isinstance(strict, DefaultPlaceholder) else strict) is True
        and inspect.iscoroutinefunction(route.dependant.call)
        and not inspect.isasyncgenfunction(route.dependant.call)
        and not route.is_sse_stream and not route.is_json_stream
        and route.max_body_size is None
        and isinstance(response_class, DefaultPlaceholder)
        and _plain(route.dependant, top=True)
        and (route.body_field is None or (len(route.dependant.body_params) == 1
                                          and not route._embed_body_fields
                                          and not getattr(route.body_field.field_info, "media_type", "")
                                          .startswith(("multipart/", "application/x-www-form"))))
    )


class _Solved:
    __slots__ = ("cache", "errors", "response")

    def __init__(self) -> None:
        self.cache: dict[Any, Any] = {}
        self.errors: list[Any] = []
        self.response: Response | None = None

    def sub_response(self) -> Response:
        if self.response is None:
            response = self.response = Response()
            del response.headers["content-length"]
            response.status_code = None  # type: ignore[assignment]  # as FastAPI: "not set"
        return self.response


async def _solve(dependant: Dependant, request: Request, solved: _Solved, body: Any) -> dict[str, Any]:
    """The call arguments of ``dependant``, in FastAPI's order: sub-dependencies, then
    path, query, header and cookie parameters, then the body. Errors go to ``solved.errors``."""
    values: dict[str, Any] = {}
    for sub in dependant.dependencies:
        errors_before = len(solved.errors)
        sub_values = await _solve(sub, request, solved, Undefined)
        if len(solved.errors) > errors_before:
            continue
        call = sub.call
        if sub.use_cache and call in solved.cache:
            value = solved.cache[call]
        else:
            value = await call(**sub_values)  # type: ignore[misc]
            solved.cache.setdefault(call, value)
        if sub.name is not None:
            values[sub.name] = value
    for fields, source in ((dependant.path_params, "path_params"), (dependant.query_params, "query_params"),
                           (dependant.header_params, "headers"), (dependant.cookie_params, "cookies")):
        if fields:
            found, errors = request_params_to_args(fields, getattr(request, source))
            values.update(found)
            solved.errors.extend(errors)
    if dependant.body_params:
        found, errors = await request_body_to_args(
            body_fields=dependant.body_params, received_body=body, embed_body_fields=False)
        values.update(found)
        solved.errors.extend(errors)
    if dependant.request_param_name:
        values[dependant.request_param_name] = request
    if dependant.http_connection_param_name:
        values[dependant.http_connection_param_name] = request
    if dependant.response_param_name:
        values[dependant.response_param_name] = solved.sub_response()
    return values


def lean_app(route: APIRoute, generic: ASGIApp,
             around: Callable[[Handler], Handler] | None = None) -> ASGIApp:
    """``route``'s ASGI app: the lean handler when it qualifies, else ``generic`` (FastAPI's).

    ``around`` wraps the lean handler as a route class's ``get_route_handler`` wraps FastAPI's.
    """
    if not _qualifies(route):
        return generic
    handler = _handler(route)
    if around is not None:
        handler = around(handler)
    has_body = route.body_field is not None
    overrides = route.dependency_overrides_provider

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if overrides is not None and getattr(overrides, "dependency_overrides", None):
            await generic(scope, receive, send)
            return
        if has_body:
            content_type = None
            for name, value in scope["headers"]:
                if name == b"content-type":
                    content_type = value
                    break
            # A form, another media type or charset: FastAPI's path. (None: the lean path answers
            # as FastAPI does, the body being rejected as bytes.)
            if content_type is not None and content_type not in _JSON_TYPES:
                await generic(scope, receive, send)
                return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except Exception as exc:
            # As FastAPI: the route's exception handlers get the request the endpoint had (its body read).
            await wrap_app_handling_exceptions(_raising(exc), request)(scope, receive, send)
            return
        await response(scope, receive, send)

    return app


def _raising(exc: Exception) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def _handler(route: APIRoute) -> Handler:
    dependant = route.dependant
    endpoint = dependant.call
    assert endpoint is not None
    body_field = route.body_field
    response_field = route.response_field
    status_code = route.status_code
    serialize: dict[str, Any] = {
        "include": route.response_model_include, "exclude": route.response_model_exclude,
        "by_alias": route.response_model_by_alias, "exclude_unset": route.response_model_exclude_unset,
        "exclude_defaults": route.response_model_exclude_defaults,
        "exclude_none": route.response_model_exclude_none,
    }
    default_class = route.response_class.value  # type: ignore[union-attr]  # checked by _qualifies

    async def handle(request: Request) -> Response:
        body: Any = Undefined
        if body_field is not None:
            body = await _read_json(request, route)
        solved = _Solved()
        values = await _solve(dependant, request, solved, body)
        if solved.errors:
            raise RequestValidationError(solved.errors, body=None if body is Undefined else body,
                                         endpoint_ctx=_context(route, request))
        raw = await endpoint(**values)
        if isinstance(raw, Response):
            return raw
        sub = solved.response  # a dependency's Response parameter: its status code wins, as in FastAPI
        code = sub.status_code if sub is not None and sub.status_code else status_code
        if response_field is not None:
            value, errors = response_field.validate(raw, {}, loc=("response",))
            if errors:
                raise ResponseValidationError(errors=errors, body=raw,
                                              endpoint_ctx=_context(route, request))
            content = response_field.serialize_json(value, **serialize)
            status: dict[str, Any] = {"status_code": code} if code is not None else {}
            response = Response(content, media_type="application/json", **status)
        else:
            response = default_class(jsonable_encoder(raw),
                                     **({"status_code": code} if code is not None else {}))
        if not is_body_allowed_for_status_code(response.status_code):
            response.body = b""
        if sub is not None:
            response.headers.raw.extend(sub.headers.raw)
        return response

    return handle


def _context(route: APIRoute, request: Request) -> Any:
    context = dict(_extract_endpoint_context(route.dependant.call))
    mount_path = request.scope.get("root_path", "").rstrip("/")
    context["path"] = f"{request.method} {mount_path}{route.dependant.path}"
    return context


async def _read_json(request: Request, route: APIRoute) -> Any:
    try:
        body = await request.body()
        if not body:
            return Undefined
        if request.headers.get("content-type") is None:
            return body  # strict content type: bytes, which the model rejects, as FastAPI
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
              "input": {}, "ctx": {"error": exc.msg}}],
            body=exc.doc, endpoint_ctx=_context(route, request),
        ) from exc
    except HTTPException:
        raise  # a body size limit's 413
    except Exception as exc:  # a client gone mid-body, a body not UTF-8 or nested too deep: as FastAPI
        if MAX_BODY_SIZE_SCOPE_KEY in request.scope and (error := get_body_limit_error(exc)):
            raise error from exc
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


def install_lean_handlers(router: APIRouter) -> int:
    """Give each route of ``router`` that offers an ``around`` wrapper the lean handler (wrapped by
    it) in front of FastAPI's; returns how many routes got it."""
    count = 0
    for route in router.routes:
        around = getattr(route, "around", None)
        if isinstance(route, APIRoute) and callable(around):
            route.app = lean_app(route, route.app, around=around)
            count += 1
    return count
