"""tooling.openapi_diff on hand-made documents: each kind of change lands in its class, and what only
adds to the API is never called breaking."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tooling.openapi_diff import Changes, compare

REF = "#/components/schemas/"
JSON = "application/json"


def _json(ref: str) -> dict[str, Any]:
    return {"content": {JSON: {"schema": {"$ref": REF + ref}}}}


BASE: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Things", "version": "1"},
    "paths": {
        "/things": {
            "get": {
                "operationId": "things.list_things",
                "parameters": [{"in": "query", "name": "limit", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100}}],
                "responses": {"200": {"description": "a page", **_json("ThingPage")}},
            },
            "post": {
                "operationId": "things.create_thing",
                "requestBody": {"required": True, **_json("ThingCreate")},
                "responses": {"201": {"description": "created", **_json("ThingRead")},
                              "422": {"description": "invalid", **_json("ErrorResponse")}},
            },
        },
        "/things/{thing_id}": {
            "get": {
                "operationId": "things.read_thing",
                "parameters": [{"in": "path", "name": "thing_id", "required": True,
                                "schema": {"type": "string", "format": "uuid"}}],
                "responses": {"200": {"description": "one", **_json("ThingRead")}},
            },
        },
    },
    "components": {"schemas": {
        "ThingCreate": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 50},
                "color": {"anyOf": [{"type": "string", "enum": ["red", "blue"]}, {"type": "null"}]},
            },
        },
        "ThingRead": {
            "type": "object", "required": ["id", "name", "color"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "name": {"type": "string"},
                "color": {"type": "string", "enum": ["red", "blue"]},
                "parent": {"anyOf": [{"$ref": REF + "ThingRead"}, {"type": "null"}]},  # a cycle
            },
        },
        "ThingPage": {"type": "object", "required": ["things"],
                      "properties": {"things": {"type": "array", "items": {"$ref": REF + "ThingRead"}}}},
        "ErrorResponse": {"type": "object", "properties": {"error": {"type": "object"}}},
    }},
}


def changed(edit: Callable[[dict[str, Any]], None]) -> Changes:
    new = copy.deepcopy(BASE)
    edit(new)
    return compare(BASE, new)


def schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = document["components"]["schemas"][name]
    return found


def operation(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = document["paths"][path][method]
    return found


def only_breaking(changes: Changes, *fragments: str) -> None:
    text = "\n".join(changes.breaking)
    for fragment in fragments:
        assert fragment in text, changes.report()


class TestNothingChanged:
    def test_the_same_document_has_no_changes(self) -> None:
        changes = compare(BASE, copy.deepcopy(BASE))
        assert not changes
        assert changes.report() == "no changes"

    def test_a_new_description_is_another_change_not_a_breaking_one(self) -> None:
        changes = changed(lambda d: operation(d, "/things", "get").update(description="All the things."))
        assert changes.breaking == []
        assert changes.additions == []
        assert changes.other


class TestBreaking:
    @pytest.mark.parametrize(("edit", "fragment"), [
        (lambda d: d["paths"].pop("/things/{thing_id}"), "removed path /things/{thing_id}"),
        (lambda d: d["paths"]["/things"].pop("post"), "removed operation POST /things (things.create_thing)"),
        (lambda d: operation(d, "/things", "get").update(operationId="things.all"),
         "operation id 'things.list_things' renamed 'things.all'"),
        (lambda d: operation(d, "/things", "get")["parameters"].append(
            {"in": "query", "name": "owner", "required": True, "schema": {"type": "string"}}),
         "new required query parameter owner"),
        (lambda d: operation(d, "/things", "get")["parameters"][0].update(required=True),
         "query parameter limit is now required"),
        (lambda d: operation(d, "/things", "get")["parameters"].clear(), "removed query parameter limit"),
        (lambda d: operation(d, "/things/{thing_id}", "get").update(
            requestBody={"required": True, **_json("ThingCreate")}), "new required request body"),
        (lambda d: schema(d, "ThingCreate")["properties"].update(size={"type": "integer"})
         or schema(d, "ThingCreate")["required"].append("size"), "new required field size"),
        (lambda d: schema(d, "ThingCreate")["required"].append("color"),
         "request body.color is now required"),
    ], ids=["removed-path", "removed-operation", "renamed-id", "new-required-parameter",
            "parameter-now-required", "removed-parameter", "new-required-body", "new-required-field",
            "field-now-required"])
    def test_a_client_that_worked_may_fail(
        self, edit: Callable[[dict[str, Any]], None], fragment: str
    ) -> None:
        only_breaking(changed(edit), fragment)

    @pytest.mark.parametrize(("edit", "fragment"), [
        (lambda d: schema(d, "ThingCreate")["properties"]["name"].update(maxLength=20), "maxLength 50 -> 20"),
        (lambda d: schema(d, "ThingCreate")["properties"]["name"].update(minLength=3), "minLength 1 -> 3"),
        (lambda d: operation(d, "/things", "get")["parameters"][0]["schema"].update(maximum=10),
         "maximum 100 -> 10"),
        (lambda d: schema(d, "ThingCreate")["properties"]["name"].update(pattern="^[a-z]+$"), "pattern None"),
        (lambda d: schema(d, "ThingCreate")["properties"]["name"].update(enum=["a", "b"]),
         "name is now limited to 2 value(s)"),
        (lambda d: schema(d, "ThingCreate")["properties"]["color"]["anyOf"][0].update(enum=["red"]),
         "color no longer accepts 'blue'"),
        (lambda d: schema(d, "ThingCreate")["properties"]["color"].update(anyOf=[{"type": "string"}]),
         "color no longer accepts null"),
        (lambda d: schema(d, "ThingCreate")["properties"].update(name={"type": "integer"}),
         "name no longer accepts a string"),
    ], ids=["max-length", "min-length", "maximum", "pattern", "new-enum", "enum-value-removed",
            "null-removed", "type-changed"])
    def test_a_narrowed_request_type_enum_or_constraint(
        self, edit: Callable[[dict[str, Any]], None], fragment: str
    ) -> None:
        only_breaking(changed(edit), fragment)

    @pytest.mark.parametrize(("edit", "fragment"), [
        (lambda d: schema(d, "ThingRead")["properties"].pop("name"), "removed response field name"),
        (lambda d: schema(d, "ThingRead")["required"].remove("color"), ".color may now be absent"),
        (lambda d: schema(d, "ThingRead")["properties"].update(
            name={"anyOf": [{"type": "string"}, {"type": "null"}]}), ".name may now be null"),
        (lambda d: schema(d, "ThingRead")["properties"]["color"].update(enum=["red", "blue", "green"]),
         ".color may now be 'green'"),
        (lambda d: operation(d, "/things/{thing_id}", "get")["responses"].pop("200"), "removed response 200"),
    ], ids=["removed-field", "field-may-be-absent", "may-be-null", "new-enum-value", "removed-success"])
    def test_a_response_a_client_reads_lost_or_widened_something(
        self, edit: Callable[[dict[str, Any]], None], fragment: str
    ) -> None:
        only_breaking(changed(edit), fragment)

    def test_a_field_removed_from_a_closed_request_body_is_refused_now(self) -> None:
        changes = changed(lambda d: schema(d, "ThingCreate")["properties"].pop("color"))
        only_breaking(changes, "field color removed (now refused)")

    def test_a_change_deep_in_a_list_is_found_through_refs(self) -> None:
        changes = changed(lambda d: schema(d, "ThingRead")["properties"].pop("id"))
        only_breaking(changes,
                      "GET /things (things.list_things): response 200.things[]: removed response field id")


class TestAdditions:
    @pytest.mark.parametrize(("edit", "fragment"), [
        (lambda d: d["paths"].update({"/widgets": {"get": {"operationId": "widgets.list_widgets",
                                                           "responses": {"200": {"description": "ok"}}}}}),
         "new operation GET /widgets (widgets.list_widgets)"),
        (lambda d: d["paths"]["/things/{thing_id}"].update(
            delete={"operationId": "things.delete_thing", "responses": {"204": {"description": "x"}}}),
         "new operation DELETE /things/{thing_id} (things.delete_thing)"),
        (lambda d: operation(d, "/things", "get")["parameters"].append(
            {"in": "query", "name": "q", "required": False, "schema": {"type": "string"}}),
         "new optional query parameter q"),
        (lambda d: schema(d, "ThingCreate")["properties"].update(size={"type": "integer"}),
         "new optional field size"),
        (lambda d: operation(d, "/things/{thing_id}", "get")["responses"].update(
            {"404": {"description": "not found", **_json("ErrorResponse")}}), "new response 404"),
        (lambda d: schema(d, "ThingRead")["properties"].update(size={"type": "integer"}),
         "new response field size"),
    ], ids=["new-path", "new-operation", "new-optional-parameter", "new-optional-field", "new-response",
            "new-response-field"])
    def test_an_addition_is_not_breaking(self, edit: Callable[[dict[str, Any]], None], fragment: str) -> None:
        changes = changed(edit)
        assert changes.breaking == [], changes.report()
        assert any(fragment in line for line in changes.additions), changes.report()

    @pytest.mark.parametrize("edit", [
        lambda d: schema(d, "ThingCreate")["properties"]["name"].update(maxLength=500),
        lambda d: schema(d, "ThingCreate")["properties"]["color"]["anyOf"][0].update(
            enum=["red", "blue", "green"]),
        lambda d: operation(d, "/things", "get")["parameters"][0]["schema"].pop("maximum"),
        lambda d: schema(d, "ThingRead")["properties"]["color"].update(enum=["red"]),
    ], ids=["longer-text", "more-enum-values", "no-maximum", "fewer-response-values"])
    def test_a_widened_request_or_a_narrowed_response_is_not_breaking(
        self, edit: Callable[[dict[str, Any]], None]
    ) -> None:
        changes = changed(edit)
        assert changes.breaking == [], changes.report()
        assert changes


def test_the_report_names_breaking_changes_before_additions() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["paths"]["/things"].pop("post")
        operation(d, "/things", "get")["parameters"].append(
            {"in": "query", "name": "q", "required": False, "schema": {"type": "string"}})

    report = changed(edit).report()
    assert report.index("BREAKING changes (1)") < report.index("Additions (1)")
    assert "removed operation POST /things" in report.split("Additions")[0]
    assert "new optional query parameter q" in report.split("Additions")[1]
