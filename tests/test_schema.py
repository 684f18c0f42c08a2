"""The OpenAPI schema and the docs pages that drf-spectacular serves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from rest_framework.test import APIClient

from messaging.docs import ASYNC_EXAMPLES, STATE_EXAMPLES, VALIDATE_EXAMPLES
from messaging.serializers import check_request
from tests.conftest import RUNS_THE_WORKER

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def schema(django_db_blocker: Any) -> dict[str, Any]:
    from drf_spectacular.generators import SchemaGenerator

    with django_db_blocker.unblock():
        return SchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-any-return]


def test_the_schema_validates_without_warnings(tmp_path: Path) -> None:
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert yaml.safe_load((tmp_path / "schema.yaml").read_text())["openapi"].startswith("3.")


def _refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """Every `$ref` in the schema, with the JSON pointer of the object that holds it."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield where, node["$ref"]
        for key, value in node.items():
            yield from _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _refs(value, f"{where}/{index}")


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    node: Any = schema
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def test_every_reference_in_the_schema_resolves(schema: dict[str, Any]) -> None:
    # An unresolved $ref makes fuzzers send no body and client generators drop the operation.
    dangling = [(where, ref) for where, ref in _refs(schema) if _resolve(schema, ref) is None]

    assert dangling == []


def _union_of(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The `oneOf` with a discriminator inside `node` (a property, or an array of it)."""
    for option in node.get("oneOf", [node]):
        items = option.get("items", option) if option.get("type") == "array" else option
        if "$ref" in items:
            items = _resolve(schema, items["$ref"])
        if "discriminator" in items:
            return items  # type: ignore[no-any-return]
    raise AssertionError(f"no discriminated union in {node}")


@pytest.mark.parametrize(
    ("component", "field", "kinds"),
    [
        ("ChatMessageRequest", "content", ["text", "image", "tool_use", "tool_result", "thinking", "mcp_tool_use", "mcp_tool_result"]),
        ("ToolResultBlockRequest", "content", ["text", "image"]),
    ],
)
def test_content_blocks_are_a_discriminated_union_of_named_components(
    schema: dict[str, Any], component: str, field: str, kinds: list[str]
) -> None:
    union = _union_of(schema, schema["components"]["schemas"][component]["properties"][field])
    mapping = union["discriminator"]["mapping"]

    assert union["discriminator"]["propertyName"] == "type"
    assert list(mapping) == kinds
    assert [option["$ref"] for option in union["oneOf"]] == list(mapping.values())
    for kind, ref in mapping.items():
        block = _resolve(schema, ref)
        assert "type" in block["required"], ref
        assert _resolve(schema, block["properties"]["type"]["$ref"])["enum"] == [kind], ref


def test_the_system_prompt_refers_to_named_components(schema: dict[str, Any]) -> None:
    system = schema["components"]["schemas"]["ChatRequest"]["properties"]["system"]
    options = {option.get("type", option.get("$ref")): option for option in system["oneOf"]}

    assert set(options) == {"string", "#/components/schemas/SystemRequest", "array"}
    assert options["array"]["items"] == {"$ref": "#/components/schemas/TextBlockRequest"}
    assert _resolve(schema, "#/components/schemas/SystemRequest")["required"] == ["prompt"]


def _events(stream: str) -> list[dict[str, str]]:
    """A text/event-stream body as the objects an EventSource delivers: {id?, event, data}."""
    events = []
    for frame in stream.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        events.append(fields)
    return events


@pytest.mark.parametrize(("path", "method"), [("/v1/messages/{message_id}/stream", "get"), ("/v1/messages", "post")])
def test_an_event_stream_is_documented_event_by_event(schema: dict[str, Any], path: str, method: str) -> None:
    from jsonschema import Draft202012Validator

    from messaging.schema import _SSE_EXAMPLE

    # Schemathesis (and OpenAPI 3.2's itemSchema) check a stream's schema against each event; a
    # generated client reads the whole body as text. (`components` beside the schema: its $refs.)
    stream_schema = schema["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    validator = Draft202012Validator({**stream_schema, "components": schema["components"]})
    event_only = Draft202012Validator({"$ref": "#/components/schemas/ServerSentEvent", "components": schema["components"]})

    assert stream_schema == {"$ref": "#/components/schemas/EventStream"}
    assert [list(validator.iter_errors(event)) for event in _events(_SSE_EXAMPLE)] == [[]] * 9
    assert [list(event_only.iter_errors(event)) for event in _events(_SSE_EXAMPLE)] == [[]] * 9
    assert validator.is_valid(_SSE_EXAMPLE)
    assert not validator.is_valid({"event": "status"})  # no data


def test_it_documents_every_endpoint(schema: dict[str, Any]) -> None:
    assert set(schema["paths"]) >= {
        "/v1/messages/validate",
        "/v1/messages/async",
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/messages/{message_id}/cancel",
        "/v1/models",
    }


def test_operation_ids_are_stable_function_names(schema: dict[str, Any]) -> None:
    # Generated clients name their functions after these (messages_create_async.sync(...)):
    # renaming one breaks every integrator's code.
    operation_ids = {f"{method.upper()} {path}": op["operationId"] for path, ops in schema["paths"].items() for method, op in ops.items()}

    assert operation_ids == {
        "POST /v1/messages/validate": "messages_validate",
        "POST /v1/messages/async": "messages_create_async",
        "POST /v1/messages": "messages_create",
        "GET /v1/messages": "messages_list",
        "GET /v1/messages/{message_id}": "messages_get",
        "GET /v1/messages/{message_id}/stream": "messages_stream",
        "POST /v1/messages/{message_id}/cancel": "messages_cancel",
        "GET /v1/models": "models_list",
    }


def _inline_shapes(node: Any, where: str) -> Iterator[str]:
    """Pointers of enums and objects with properties written inline, outside examples."""
    if isinstance(node, dict):
        if ("enum" in node or "properties" in node) and not re.fullmatch(r"#/components/schemas/[^/]+", where):
            yield where
        for key, value in node.items():
            if key not in ("examples", "example"):
                yield from _inline_shapes(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _inline_shapes(value, f"{where}/{index}")


def test_every_enum_and_object_is_a_named_component(schema: dict[str, Any]) -> None:
    # Generators make a class of each inline shape, named after where it sits (a second status
    # enum called ListMessagesStatus): one named component per shape, referred to everywhere.
    assert list(_inline_shapes(schema, "#")) == []


def test_request_bodies_are_json_only(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert list(operation["requestBody"]["content"]) == ["application/json"], (path, method)


def test_every_operation_documents_its_errors_in_the_error_shape(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "401" in operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (path, method, status)


def test_the_status_enum_has_a_stable_name(schema: dict[str, Any]) -> None:
    assert schema["components"]["schemas"]["MessageStatusEnum"]["enum"] == [
        "pending", "processing", "completed", "failed", "error", "cancelled", "expired",
    ]


def test_the_request_examples_are_valid_requests() -> None:
    for example in (*VALIDATE_EXAMPLES, *ASYNC_EXAMPLES):
        if example.request_only:
            assert check_request(example.value, endpoint="async").errors == []


def test_the_validate_example_matches_what_the_service_answers(alice: APIClient) -> None:
    request_example = next(e.value for e in VALIDATE_EXAMPLES if e.request_only)
    valid_example = next(e.value for e in VALIDATE_EXAMPLES if e.name == "Valid")

    assert alice.post("/v1/messages/validate", request_example, format="json").json() == valid_example


@RUNS_THE_WORKER
def test_the_completed_example_matches_what_the_service_answers(alice: APIClient) -> None:
    from messaging import runner

    request_example = next(e.value for e in ASYNC_EXAMPLES if e.request_only)
    message_id = alice.post("/v1/messages/async", request_example, format="json").json()["message_id"]
    runner.run_one()
    state = alice.get(f"/v1/messages/{message_id}").json()
    example = STATE_EXAMPLES[0].value

    assert set(state) == set(example)
    assert set(state["result"]) == set(example["result"])
    assert state["result"]["content"] == example["result"]["content"]
    assert state["result"]["usage"] == example["result"]["usage"]


@pytest.mark.parametrize("page", ["/v1/docs", "/v1/redoc"])
def test_the_docs_pages_load_nothing_from_a_cdn(anonymous: APIClient, page: str) -> None:
    response = anonymous.get(page)

    assert response.status_code == 200
    html = response.content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources, "the page should reference its assets"
    assert all(not s.startswith(("http://", "https://", "//")) for s in sources), sources
    for source in sources:
        if source.startswith("/static/"):
            assert anonymous.get(source).status_code == 200, source


def test_the_schema_is_served_without_a_key(anonymous: APIClient) -> None:
    response = anonymous.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    assert "/v1/messages/async" in response.json()["paths"]


def test_there_are_no_missing_migrations() -> None:
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
