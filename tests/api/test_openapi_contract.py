"""The OpenAPI document tells the truth (issue 16), and it is the committed ``openapi.json``.

The document is built as ``/openapi.json`` serves it (``create_app``, the settings the snapshot pins).
Its claims are checked against the server where a claim is about behaviour: the payment route answers
400 without an ``Idempotency-Key``, a currency outside the documented enum is refused, a null field of
a partial item update is refused.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import ValidationError

from core.edge.auth import CurrentPrincipal
from core.edge.error_handlers import envelope
from core.edge.idempotency import KEY_HEADER, KEY_MAX, KEY_PATTERN
from core.edge.openapi import BEARER_CODES, OPERATION_ID, ErrorResponse, install_openapi, operation_id
from core.edge.routes import TransactionalRoute, add_routes
from modules.billing.adapters.gateway import SIGNATURE_HEADER
from modules.items.domain import CURRENCIES
from modules.items.schemas import ItemCreate, ItemUpdate
from tests.support.api import bearer, make_admin, sign_up
from tests.support.billing import INVOICES, ITEMS, new_invoice, new_item
from tests.support.envelope import assert_envelope
from tests.support.settings import make_settings
from tests.support.stack import Stack
from tooling import openapi_snapshot

ERROR_REF = "#/components/schemas/ErrorResponse"
JSON = "application/json"
CODE = re.compile(r"^[a-z][a-z0-9_]*$")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_snapshot.document(make_settings(**openapi_snapshot.PINNED))


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in sorted(document["paths"].items()):
        for method, operation in sorted(item.items()):
            yield f"{method.upper()} {path}", operation


def by_id(document: dict[str, Any], wanted: str) -> dict[str, Any]:
    [found] = [op for _, op in operations(document) if op["operationId"] == wanted]
    return found


def codes(operation: dict[str, Any], status: int) -> list[str]:
    listed: list[str] = operation["responses"][str(status)]["x-error-codes"]
    return listed


# --- the snapshot ----------------------------------------------------------------------------------


def test_the_document_is_the_committed_snapshot(document: dict[str, Any]) -> None:
    snapshot = openapi_snapshot.SNAPSHOT
    committed = snapshot.read_text(encoding="utf-8") if snapshot.is_file() else None
    problem = openapi_snapshot.stale(committed, document)
    assert problem is None, (
        f"{snapshot.name} differs from the document the app serves. If the change is meant, run "
        f"`.venv/bin/python -m tooling.openapi_snapshot` and commit the file; clients see:\n{problem}"
    )


def test_the_snapshot_is_rendered_stably(document: dict[str, Any]) -> None:
    text = openapi_snapshot.render(document)
    assert text == openapi_snapshot.render(json.loads(text))
    assert text.endswith("}\n")
    assert text.isascii()


# --- operation ids and names -----------------------------------------------------------------------


def test_every_operation_id_is_module_dot_endpoint_and_unique(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, op in operations(document)]
    assert [i for i in ids if not OPERATION_ID.match(i)] == []
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    owners = {i.partition(".")[0] for i in ids}
    assert owners == {"health", "users", "items", "billing"}
    named = {key: op["operationId"] for key, op in operations(document)}
    assert named["POST /api/v1/items"] == "items.create_item"
    assert named["POST /api/v1/invoices/{invoice_id}/payments"] == "billing.pay_invoice"
    assert named["POST /api/v1/auth/token"] == "users.issue_token"
    assert named["GET /health/live"] == "health.live"


def test_no_generated_name_is_left(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    for generated in ("api_v1", "Api V1", "Body_", "Response_", "HTTPValidationError"):
        assert generated not in text
    assert "ValidationError" not in document["components"]["schemas"]
    form = document["paths"]["/api/v1/auth/token"]["post"]["requestBody"]["content"][
        "application/x-www-form-urlencoded"]["schema"]["$ref"]
    assert form.endswith("/IssueTokenForm")
    webhook = document["paths"]["/api/v1/webhooks/payment-gateway"]["post"]["responses"]["200"]
    assert webhook["content"][JSON]["schema"]["$ref"].endswith("/WebhookReceipt")


def test_a_new_modules_routes_get_readable_ids_and_the_envelope_without_extra_code() -> None:
    """A router written like the scaffold's (tooling/scaffold/templates/module/router.py.tmpl)."""
    router = APIRouter(prefix="/notes", tags=["notes"], route_class=TransactionalRoute)

    async def read_note(note_id: uuid.UUID, principal: CurrentPrincipal) -> dict[str, str]:
        return {"id": str(note_id), "owner": str(principal.user_id)}

    read_note.__module__ = "modules.notes.router"
    router.add_api_route("/{note_id}", read_note, responses={401: {"description": "not authenticated"},
                                                             404: {"description": "not found"}})
    app = FastAPI(generate_unique_id_function=operation_id)
    install_openapi(app)
    add_routes(app.router, router, prefix="/api/v1")  # as create_app adds a module's routes
    operation = app.openapi()["paths"]["/api/v1/notes/{note_id}"]["get"]
    assert operation["operationId"] == "notes.read_note"
    assert codes(operation, 401) == list(BEARER_CODES)
    assert codes(operation, 404) == ["not_found"]
    assert codes(operation, 422) == ["validation_error"]
    assert codes(operation, 503) == ["service_unavailable"]
    assert all(operation["responses"][s]["content"][JSON]["schema"]["$ref"] == ERROR_REF
               for s in ("401", "404", "422", "500", "503"))


# --- the error envelope ----------------------------------------------------------------------------


def test_every_error_response_of_every_operation_is_the_envelope(document: dict[str, Any]) -> None:
    for key, operation in operations(document):
        errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
        assert "500" in errors, key
        for status, response in errors.items():
            where = f"{key} {status}"
            assert response["content"] == {JSON: {"schema": {"$ref": ERROR_REF}}}, where
            listed = response["x-error-codes"]
            assert listed, where
            assert all(CODE.match(c) for c in listed), where
            assert all(f"`{c}`" in response["description"] for c in listed), where


def test_the_edge_errors_are_listed_where_they_occur(document: dict[str, Any]) -> None:
    for key, operation in operations(document):
        body = operation.get("requestBody", {}).get("content", {})
        if body:
            assert "payload_too_large" in codes(operation, 413), key
        # The webhook reads its body itself, to check the signature over the exact bytes: malformed
        # JSON is refused as invalid_signature (test_a_malformed_webhook_body_is_an_invalid_signature).
        if JSON in body and operation["operationId"] != "billing.gateway_webhook":
            assert "invalid_json" in codes(operation, 400), key
        if operation.get("security"):
            assert set(BEARER_CODES) <= set(codes(operation, 401)), key
        limited = key.split(" ")[1].startswith("/api/v1/")
        assert ("429" in operation["responses"]) is limited, key
        if limited:
            assert "rate_limited" in codes(operation, 429)
            assert "service_unavailable" in codes(operation, 503), key


def test_the_modules_error_codes_are_listed(document: dict[str, Any]) -> None:
    assert "invalid_cursor" in codes(by_id(document, "items.list_items"), 400)
    assert "invalid_cursor" in codes(by_id(document, "billing.list_invoices"), 400)
    pay = by_id(document, "billing.pay_invoice")
    assert {"idempotency_key_required", "invalid_idempotency_key", "invalid_json"} <= set(codes(pay, 400))
    conflicts = {"invoice_not_open", "payment_in_progress", "idempotency_request_in_progress"}
    assert conflicts <= set(codes(pay, 409))
    assert {"validation_error", "idempotency_key_reused"} <= set(codes(pay, 422))
    assert codes(by_id(document, "billing.gateway_webhook"), 400) == ["invalid_signature"]
    assert "mixed_currencies" in codes(by_id(document, "billing.create_invoice"), 422)
    assert codes(by_id(document, "users.sign_up"), 409) == ["email_taken"]
    assert "refresh_token_reused" in codes(by_id(document, "users.refresh"), 401)
    assert codes(by_id(document, "health.ready"), 503) == ["not_ready"]
    assert "503" not in by_id(document, "health.live")["responses"]


def test_the_error_schema_is_what_the_server_sends(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    body = schemas["ErrorBody"]
    assert set(body["required"]) == {"code", "message", "details"}
    assert body["properties"]["details"]["type"] == "object"
    sent = envelope("not_found", "The requested resource does not exist.", {"id": 1})
    assert ErrorResponse.model_validate(sent).model_dump() == sent
    with pytest.raises(ValidationError):
        ErrorResponse.model_validate({"detail": "Not Found"})  # FastAPI's default shape is not ours


# --- the document matches the server ---------------------------------------------------------------


def _header(operation: dict[str, Any], name: str) -> dict[str, Any] | None:
    found = [p for p in operation.get("parameters", [])
             if p["in"] == "header" and p["name"].lower() == name.lower()]
    return found[0] if found else None


def test_the_idempotency_key_is_required_where_the_server_requires_it(document: dict[str, Any]) -> None:
    documented = {op["operationId"]: p for _, op in operations(document) if (p := _header(op, KEY_HEADER))}
    assert set(documented) == {"billing.pay_invoice"}
    key = documented["billing.pay_invoice"]
    assert key["required"] is True
    assert (key["schema"]["minLength"], key["schema"]["maxLength"], key["schema"]["pattern"]) == (
        1, KEY_MAX, KEY_PATTERN)


def test_the_webhook_documents_its_signature_header(document: dict[str, Any]) -> None:
    header = _header(by_id(document, "billing.gateway_webhook"), SIGNATURE_HEADER)
    assert header is not None
    assert header["required"] is True


def _currency_schemas(document: dict[str, Any]) -> list[dict[str, Any]]:
    schemas = document["components"]["schemas"]
    parameters = by_id(document, "items.list_items")["parameters"]
    [query] = [p["schema"] for p in parameters if p["name"] == "currency"]
    non_null = [s for s in query["anyOf"] if s.get("type") != "null"]
    return [schemas["ItemCreate"]["properties"]["currency"], schemas["ItemUpdate"]["properties"]["currency"],
            *non_null]


def test_the_currency_enum_is_the_set_the_server_accepts(document: dict[str, Any]) -> None:
    found = _currency_schemas(document)
    assert len(found) == 3
    for schema in found:
        assert schema["enum"] == sorted(CURRENCIES)
    for code in CURRENCIES:
        ItemCreate.model_validate({"name": "n", "price": 1, "currency": code})
    for outside in ("XAU", "ABC", "EUX"):
        assert outside not in found[0]["enum"]
        with pytest.raises(ValidationError):
            ItemCreate.model_validate({"name": "n", "price": 1, "currency": outside})


def test_item_update_fields_are_optional_but_not_nullable(document: dict[str, Any]) -> None:
    update = document["components"]["schemas"]["ItemUpdate"]
    assert set(update["properties"]) == {"name", "description", "price", "currency"}
    assert "required" not in update
    for name, field in update["properties"].items():
        assert "anyOf" not in field, name
        assert field.get("type") not in (None, "null"), name
        assert field.get("default", "absent") is not None, name
        with pytest.raises(ValidationError):
            ItemUpdate.model_validate({name: None})


class TestAgainstTheRunningApp:
    async def test_openapi_json_serves_this_document(self, stack: Stack) -> None:
        served = await stack.client.get("/openapi.json")
        assert served.status_code == 200
        assert served.json() == stack.app.openapi()
        assert "ErrorResponse" in served.json()["components"]["schemas"]

    async def test_paying_without_an_idempotency_key_is_a_400(self, stack: Stack) -> None:
        admin = bearer(await make_admin(stack))
        _, token = await sign_up(stack.client)
        user = bearer(token)
        invoice = await new_invoice(stack, user, (await new_item(stack, admin), 1))
        url = f"{INVOICES}/{invoice['id']}/payments"
        body = {"payment_token": "tok_visa"}

        missing = await stack.client.post(url, json=body, headers=user)
        assert_envelope(missing, 400, "idempotency_key_required")
        ErrorResponse.model_validate(missing.json())
        spaced = await stack.client.post(url, json=body, headers={**user, KEY_HEADER: "has a space"})
        assert_envelope(spaced, 400, "invalid_idempotency_key")
        accepted = await stack.client.post(url, json=body, headers={**user, KEY_HEADER: uuid.uuid4().hex})
        assert accepted.status_code == 202, accepted.text

    async def test_a_currency_outside_the_enum_is_refused_and_one_inside_accepted(self, stack: Stack) -> None:
        admin = bearer(await make_admin(stack))
        body = {"name": f"enum-{uuid.uuid4().hex[:8]}", "price": 100}
        refused = await stack.client.post(ITEMS, json={**body, "currency": "XAU"}, headers=admin)
        assert_envelope(refused, 422, "validation_error")
        accepted = await stack.client.post(ITEMS, json={**body, "currency": "JPY"}, headers=admin)
        assert accepted.status_code == 201, accepted.text

    async def test_a_null_field_of_an_item_update_is_refused(self, stack: Stack) -> None:
        admin = bearer(await make_admin(stack))
        item = await new_item(stack, admin)
        answer = await stack.client.patch(f"{ITEMS}/{item}", json={"currency": None}, headers=admin)
        assert_envelope(answer, 422, "validation_error")


async def test_a_malformed_webhook_body_is_an_invalid_signature(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/webhooks/payment-gateway", content=b'{"id": ',
                                 headers={"content-type": "application/json",
                                          "Atrium-Gateway-Signature": "t=1,v1=00"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
