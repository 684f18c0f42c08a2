"""The OpenAPI schema and the docs pages that drf-spectacular serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from rest_framework.test import APIClient

from messaging.docs import ASYNC_EXAMPLES, STATE_EXAMPLES, VALIDATE_EXAMPLES
from messaging.serializers import check_request

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def schema(django_db_blocker: Any) -> dict[str, Any]:
    from drf_spectacular.generators import SchemaGenerator

    with django_db_blocker.unblock():
        return SchemaGenerator().get_schema(request=None, public=True)  # type: ignore[no-any-return]


def test_the_schema_validates_without_warnings(tmp_path: Path) -> None:
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert yaml.safe_load((tmp_path / "schema.yaml").read_text())["openapi"].startswith("3.")


def test_it_documents_every_endpoint(schema: dict[str, Any]) -> None:
    assert set(schema["paths"]) >= {
        "/v1/messages/validate",
        "/v1/messages/async",
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/messages/{message_id}/cancel",
        "/v1/models",
    }


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
        "pending", "processing", "completed", "failed", "error", "cancelled",
    ]


def test_the_request_examples_are_valid_requests() -> None:
    for example in (*VALIDATE_EXAMPLES, *ASYNC_EXAMPLES):
        if example.request_only:
            assert check_request(example.value, endpoint="async").errors == []


def test_the_validate_example_matches_what_the_service_answers(alice: APIClient) -> None:
    request_example = next(e.value for e in VALIDATE_EXAMPLES if e.request_only)
    valid_example = next(e.value for e in VALIDATE_EXAMPLES if e.name == "Valid")

    assert alice.post("/v1/messages/validate", request_example, format="json").json() == valid_example


def test_the_completed_example_matches_what_the_service_answers(alice: APIClient) -> None:
    from messaging import tasks

    request_example = next(e.value for e in ASYNC_EXAMPLES if e.request_only)
    message_id = alice.post("/v1/messages/async", request_example, format="json").json()["message_id"]
    tasks.process_next()
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
