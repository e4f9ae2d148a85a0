"""The OpenAPI document, told true: readable operation ids, and every error as the envelope it is.

- ``operation_id`` names each operation ``<module>.<endpoint>`` (``items.create_item``,
  ``billing.pay_invoice``, ``health.live``): the module is the package under ``modules/`` that holds
  the endpoint (for anything else, the last part of its Python module), the endpoint is the route's
  name (its function's, unless the route sets ``name=``). The app passes it to FastAPI as
  ``generate_unique_id_function``, so a new module's routes get such ids without a line of code.
- ``errors({409: ["invoice_not_open", ...]})`` is what a route passes as ``responses=`` to list the
  error codes it answers, per status.
- ``install_openapi`` makes ``app.openapi()`` add, to every operation, the errors the edge itself
  answers (422 ``validation_error`` where FastAPI validates parameters or a body, 400 ``invalid_json``
  with a JSON body, 413 ``payload_too_large`` with any body, 401 ``not_authenticated`` /
  ``invalid_token`` / ``account_disabled`` on bearer routes, 429 ``rate_limited`` (and 503
  ``rate_limiter_unavailable`` when the limiter fails closed) where a rate limit applies, 503
  ``service_unavailable`` where a use case reaches the database, 500 ``internal_error`` everywhere),
  and documents every 4xx/5xx body as ``ErrorResponse``, with its codes in the description and in
  ``x-error-codes``. FastAPI's own ``HTTPValidationError`` leaves the document: a 422 is the envelope
  like any other error.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "ErrorResponse"
REF = "#/components/schemas/"
CODES = "x-error-codes"  # the extension listing, per response, the codes ``error.code`` may hold
JSON = "application/json"

# The code each status gets when nothing more precise is declared: the base classes of
# core.edge.errors and what core.edge.error_handlers answers for a bare HTTP error.
GENERIC_CODES: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 422: "validation_error",
    429: "rate_limited", 500: "internal_error", 503: "service_unavailable",
}
# What a bearer route answers without a live session (core.edge.auth).
BEARER_CODES = ("not_authenticated", "invalid_token", "account_disabled")


class ErrorBody(BaseModel):
    """What went wrong: a stable code to branch on, a message for people, details by code."""

    model_config = ConfigDict(title="ErrorBody")

    code: str = Field(description="stable and machine-readable; each response lists the codes it may carry",
                      examples=["not_found"])
    message: str = Field(description="for people; its wording may change",
                         examples=["The requested resource does not exist."])
    details: dict[str, Any] = Field(description="more about this error, by code (e.g. the fields of a "
                                                "validation_error); often empty", examples=[{}])


class ErrorResponse(BaseModel):
    """The body of every error the API answers: ``{"error": {"code", "message", "details"}}``."""

    model_config = ConfigDict(title=SCHEMA)

    error: ErrorBody


def operation_id(route: APIRoute) -> str:
    """``<module>.<endpoint>``: the operation id of ``route`` (FastAPI's ``generate_unique_id_function``)."""
    parts = (getattr(route.endpoint, "__module__", None) or "app").split(".")
    owner = parts[1] if parts[0] == "modules" and len(parts) > 1 else parts[-1]
    return f"{owner}.{route.name}"


OPERATION_ID = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")  # what operation_id makes of Python names


def errors(codes: Mapping[int, str | Sequence[str]]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: per status, the error codes it may answer (the envelope and the
    edge's own codes are added by ``install_openapi``), e.g.
    ``errors({404: "not_found", 409: ["invoice_not_open", "payment_in_progress"]})``."""
    return {
        status: {"description": _phrase(status), CODES: [names] if isinstance(names, str) else list(names)}
        for status, names in codes.items()
    }


def links(status: int, **named: Mapping[str, Any]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entry for a success ``status``: the OpenAPI links from its response to the
    operations it feeds, by name, each made by ``link``. Clients that follow links (schemathesis's
    stateful phase) chain the operations with them: ``links(201, ReadItem=link("items.read_item",
    item_id=ID))``."""
    return {status: {"links": dict(named)}}


def link(operation_id: str, description: str, body: Mapping[str, Any] | None = None,
         **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to ``operation_id``: its parameters, and fields of its body, as runtime
    expressions (``ID``: the ``id`` of the response body). ``refine`` refuses a link to an operation
    the document does not have."""
    target: dict[str, Any] = {"operationId": operation_id, "description": description}
    if parameters:
        target["parameters"] = parameters
    if body is not None:
        target["requestBody"] = dict(body)
    return target


ID = "$response.body#/id"  # the runtime expression of a created resource's id
LINKED_FROM = "x-linked-from"  # openapi_extra of a route: links into it, which ``refine`` moves
RAW_BODY = "x-raw-body"  # openapi_extra of a route that parses its body itself (``raw_body``); removed


def linked_from(operation_id: str, status: int, **named: Mapping[str, Any]) -> dict[str, Any]:
    """``openapi_extra=`` of a route that the ``status`` response of ``operation_id``, an operation of
    a module its own depends on, feeds: the links (each a ``link`` to this route's operation) go on
    that response. A module names only the operations of the modules it depends on, so the link is
    declared by the module that depends: ``linked_from("items.create_item", 201,
    InvoiceItem=link("billing.create_invoice", ..., body={...}))``."""
    return {LINKED_FROM: [{"operationId": operation_id, "status": str(status), "links": dict(named)}]}


def raw_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """``openapi_extra=`` of a route that reads its body itself (raw bytes, e.g. to check a signature
    over them): ``model``'s JSON schema as the required JSON body, nested models inlined, so the
    document still says what the body holds. Only the document uses ``model``."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(copy.deepcopy(definitions[ref.removeprefix("#/$defs/")]))
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": inline(schema)}}},
            RAW_BODY: True}


def with_codes(
    responses: Mapping[int | str, dict[str, Any]] | None, status: int, *names: str
) -> dict[int | str, dict[str, Any]]:
    """A copy of a route's ``responses=`` that also lists ``names`` under ``status`` (kept beside
    the codes the route declared there itself)."""
    merged = {key: dict(value) for key, value in (responses or {}).items()}
    key: int | str = status if status in merged or str(status) not in merged else str(status)
    response = merged.setdefault(key, {"description": _phrase(status)})
    listed = list(response.get(CODES) or [])
    response[CODES] = listed + [name for name in names if name not in listed]
    return merged


def not_nullable(schema: dict[str, Any], model: type[Any] | None = None) -> None:
    """``json_schema_extra`` of a model whose optional fields may be left out but never sent as null
    (a partial update): each field's schema loses its ``null`` alternative and its ``null`` default."""
    for field in schema.get("properties", {}).values():
        alternatives = field.get("anyOf")
        if alternatives and {"type": "null"} in alternatives:
            kept = [alt for alt in alternatives if alt != {"type": "null"}]
            del field["anyOf"]
            if len(kept) == 1:
                field.update({k: v for k, v in kept[0].items() if k not in field})
            else:
                field["anyOf"] = kept
        if "default" in field and field["default"] is None:
            del field["default"]


def partial_update(schema: dict[str, Any], model: type[Any] | None = None) -> None:
    """``json_schema_extra`` of a partial update whose validator refuses an empty body: its fields are
    ``not_nullable`` and at least one must be sent (``minProperties: 1``)."""
    not_nullable(schema, model)
    schema["minProperties"] = 1


class RateLimitPolicy(Protocol):
    """What the document needs of ``core.ratelimit.RateLimits``: where a limit applies, and whether
    a limiter outage refuses requests (503) or lets them through."""

    enabled: bool
    fail_open: bool

    def policy_for(self, path: str) -> object | None: ...


def install_openapi(app: FastAPI, limits: RateLimitPolicy | None = None) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) the refined document (``refine``), built once."""
    stock = app.openapi

    def rate_limited(path: str) -> bool:
        return limits is not None and limits.enabled and limits.policy_for(path) is not None

    fails_closed = limits is not None and limits.enabled and not limits.fail_open

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = refine(stock(), rate_limited=rate_limited, limiter_fails_closed=fails_closed)
        return app.openapi_schema

    # FastAPI's documented way to change the document ("Extending OpenAPI"): replace the method.
    app.openapi = openapi  # type: ignore[method-assign]


def refine(
    document: Mapping[str, Any],
    *,
    rate_limited: Callable[[str], bool] = lambda path: False,
    limiter_fails_closed: bool = False,
) -> dict[str, Any]:
    """A copy of FastAPI's ``document`` with the edge's errors on every operation, every error body
    the envelope, generated model names made readable and unused schemas gone.

    ``rate_limited(path)``: a rate limit applies there (429; and 503 ``rate_limiter_unavailable`` when
    ``limiter_fails_closed``). A route that reaches the backing services declares its own 503
    ``service_unavailable`` (``core.edge.routes.TransactionalRoute`` does, with ``errors``)."""
    refined = copy.deepcopy(dict(document))
    schemas: dict[str, Any] = refined.setdefault("components", {}).setdefault("schemas", {})
    _move_links(refined)
    operation_ids = {operation.get("operationId") for _, _, operation in _operations(refined)}
    for path, _, operation in _operations(refined):
        _document_errors(operation, rate_limited(path), limiter_fails_closed)
        _name_generated_schemas(refined, schemas, operation)
        _check_links(operation, operation_ids)
    envelope = ErrorResponse.model_json_schema(ref_template=REF + "{model}")
    for name, schema in {**envelope.pop("$defs", {}), SCHEMA: envelope}.items():
        # A route may name the envelope itself ({"model": ErrorResponse}); another model of that name may not.
        if name in schemas and set(schemas[name].get("properties", {})) != set(schema["properties"]):
            raise ValueError(f"the OpenAPI document already has another schema named {name}")
        schemas[name] = schema
    used = _reachable(refined)
    refined["components"]["schemas"] = {name: schemas[name] for name in sorted(schemas) if name in used}
    return refined


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                yield path, method, operation


def _document_errors(operation: dict[str, Any], limited: bool, fails_closed: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    # A status documented without codes (a bare description) gets the edge's codes for it, else the
    # generic one (404 -> not_found).
    codes: dict[str, list[str]] = {status: list(response.get(CODES) or []) for status, response in
                                   responses.items() if _is_error(status)}

    def add(status: int, *names: str) -> None:
        known = codes.setdefault(str(status), [])
        known += [name for name in names if name not in known]

    body = operation.get("requestBody", {}).get("content", {})
    # FastAPI documents a 422 where it validates parameters or a body (unless the route declared one);
    # a parameter documented by hand (openapi_extra) is read by the endpoint and refused by its own rules.
    stock_422 = responses.get("422", {}).get("content", {}).get(JSON, {}).get("schema", {})
    if stock_422.get("$ref") == REF + "HTTPValidationError" or ("422" in codes and body):
        add(422, "validation_error")
    # The edge answers malformed JSON only where FastAPI parses the body; a route that reads it raw
    # refuses it by its own rules (the webhook: invalid_signature).
    if JSON in body and not operation.pop(RAW_BODY, False):
        add(400, "invalid_json")
    if body:
        add(413, "payload_too_large")
    if operation.get("security"):
        add(401, *BEARER_CODES)
    if limited:
        add(429, "rate_limited")
        if fails_closed:
            add(503, "rate_limiter_unavailable")
    add(500, "internal_error")

    for status in sorted(codes):
        codes[status] = codes[status] or [GENERIC_CODES.get(int(status), "error")]
        response = responses.setdefault(status, {})
        head = _phrase(int(status))
        own = response.get("description")
        if own and CODES not in response and own not in (head, "Validation Error"):  # not FastAPI's default
            head = f"{head} ({own})"
        listed = ", ".join(f"`{name}`" for name in codes[status])
        response["description"] = f"{head}. `error.code`: {listed}."
        response[CODES] = codes[status]
        response["content"] = {JSON: {"schema": {"$ref": REF + SCHEMA}}}
    operation["responses"] = {status: responses[status] for status in sorted(responses)}


def _move_links(document: dict[str, Any]) -> None:
    """``linked_from`` links onto the responses they start from."""
    by_id = {operation.get("operationId"): operation for _, _, operation in _operations(document)}
    for _, _, operation in _operations(document):
        for declared in operation.pop(LINKED_FROM, []):
            source = by_id.get(declared["operationId"])
            if source is None:
                raise ValueError(f"{operation.get('operationId')} is linked from "
                                 f"{declared['operationId']!r}, which the document does not have")
            response = source.get("responses", {}).get(declared["status"])
            if response is None:
                raise ValueError(f"{operation.get('operationId')} is linked from the {declared['status']} "
                                 f"response of {declared['operationId']}, which that operation does not have")
            response.setdefault("links", {}).update(declared["links"])


def _check_links(operation: dict[str, Any], operation_ids: set[Any]) -> None:
    for status, response in operation.get("responses", {}).items():
        for name, target in response.get("links", {}).items():
            if target.get("operationId") not in operation_ids:
                raise ValueError(f"link {name} of {operation.get('operationId')} ({status}) names "
                                 f"{target.get('operationId')!r}, which the document does not have")


def _is_error(status: str) -> bool:
    return status.isdigit() and int(status) >= 400


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _name_generated_schemas(
    document: dict[str, Any], schemas: dict[str, Any], operation: dict[str, Any]
) -> None:
    """FastAPI names a body it had to assemble (a form, several body parameters) ``Body_<operation id>``
    and a response model it made of a return annotation ``Response <operation id>``: named after the
    endpoint instead (``IssueTokenForm``, ``LiveResponse``)."""
    endpoint = _camel(str(operation.get("operationId", "")).rpartition(".")[2])
    content = operation.get("requestBody", {}).get("content", {})
    for media, spec in content.items():
        ref = spec.get("schema", {}).get("$ref", "")
        old = ref.removeprefix(REF)
        if not ref.startswith(REF) or not str(schemas.get(old, {}).get("title", "")).startswith("Body_"):
            continue
        new = endpoint + ("Body" if media == JSON else "Form")
        if new in schemas:
            raise ValueError(f"cannot name the body of {operation.get('operationId')} {new}: "
                             "the name is taken")
        schemas[new] = schemas.pop(old)
        schemas[new]["title"] = new
        _replace_refs(document, REF + old, REF + new)
    for status, response in operation.get("responses", {}).items():
        if _is_error(status):
            continue
        for spec in response.get("content", {}).values():
            schema = spec.get("schema", {})
            if str(schema.get("title", "")).startswith("Response "):
                schema["title"] = endpoint + "Response"


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _replace_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value == old:
                node[key] = new
            else:
                _replace_refs(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _replace_refs(value, old, new)


def _reachable(document: dict[str, Any]) -> set[str]:
    """The component schemas the paths refer to, directly or through other schemas."""
    schemas = document.get("components", {}).get("schemas", {})
    found: set[str] = set()
    pending = [document.get("paths", {}), document.get("webhooks", {})]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF):
                name = ref.removeprefix(REF)
                if name not in found and name in schemas:
                    found.add(name)
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found
