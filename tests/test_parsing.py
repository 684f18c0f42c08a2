"""The edge of the API: bodies that are not the JSON we want, request ids, and errors that no
view meant to answer (no route, wrong method, a crash) — all in the one error shape."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import include, path
from rest_framework.test import APIClient

from messaging import errors, views
from messaging.models import MessageJob
from tests.conftest import VALID_REQUEST

VALIDATE = "/v1/messages/validate"
ASYNC = "/v1/messages/async"
GENERATED_ID = re.compile(r"^req_[0-9a-f]{32}$")


def post_raw(client: APIClient, url: str, body: bytes | str, content_type: str = "application/json") -> Any:
    return client.post(url, body, content_type=content_type)


def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    """The contract's one error shape; `errors` (every problem) is there for 400s only."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    error = body["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    if status == 400:
        assert set(error) == {"type", "message", "errors"}
        assert error["errors"][0] == error["message"]
    else:
        assert set(error) == {"type", "message"}
    return error


def nested(levels: int) -> Any:
    """`levels` objects, one inside the other, around a number."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


# --- Bodies that are not JSON -------------------------------------------------------------------


@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
@pytest.mark.parametrize(
    "body",
    ['{"messages": [', "{'messages': []}", '{"messages": []}garbage', "messages=hi", '{"a": 1,}'],
    ids=["truncated", "single quotes", "trailing garbage", "a form body labelled json", "trailing comma"],
)
def test_it_refuses_malformed_json(alice: APIClient, url: str, body: str) -> None:
    error = assert_error(post_raw(alice, url, body), 400, "invalid_request_error")

    assert error["message"].startswith("The request body is not valid JSON: ")
    assert MessageJob.objects.count() == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_it_refuses_numbers_that_are_not_finite(alice: APIClient, literal: str) -> None:
    body = json.dumps(VALID_REQUEST)[:-1] + f', "temperature": {literal}}}'

    error = assert_error(post_raw(alice, VALIDATE, body), 400, "invalid_request_error")

    assert error["message"].startswith("The request body is not valid JSON: ")


@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
@pytest.mark.parametrize("levels", [300, 5000], ids=["deeper than can be written back", "deeper than can be read"])
def test_it_refuses_absurd_nesting_without_crashing(alice: APIClient, url: str, levels: int) -> None:
    # Hidden in an unknown field, which validation ignores: the parser itself must refuse it.
    body = json.dumps(VALID_REQUEST)[:-1] + ', "extra": ' + "[" * levels + "]" * levels + "}"

    error = assert_error(post_raw(alice, url, body), 400, "invalid_request_error")

    assert error["message"] == "The request body is nested too deeply."
    assert MessageJob.objects.count() == 0


FREE_FORM = {
    "tools[0].input_schema": lambda deep: {"tools": [{"name": "t", "input_schema": {"type": "object", "x-extra": deep}}]},
    "tool_context[1]": lambda deep: {"tool_context": ["fine", deep]},
    "messages[1].content[0].input": lambda deep: {
        "messages": [
            {"role": "user", "content": "Look it up"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": deep}]},
        ]
    },
    "response_format.json_schema.schema": lambda deep: {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"x-extra": deep}}}
    },
}


@pytest.mark.parametrize("json_path", FREE_FORM)
def test_it_refuses_a_free_form_field_nested_too_deeply_naming_its_path(alice: APIClient, json_path: str) -> None:
    limit = settings.MESSAGING_MAX_JSON_DEPTH
    body = {**VALID_REQUEST, **FREE_FORM[json_path](nested(limit + 1))}

    error = assert_error(alice.post(ASYNC, body, format="json"), 400, "invalid_request_error")

    assert error["errors"] == [f"{json_path}: is nested more than {limit} levels deep"]
    assert MessageJob.objects.count() == 0


def test_it_accepts_free_form_json_nested_up_to_the_limit(alice: APIClient) -> None:
    deep = nested(settings.MESSAGING_MAX_JSON_DEPTH)
    body = {
        "messages": [
            {"role": "user", "content": "Look it up"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": deep}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
        ],
        "tool_context": [deep],
    }

    response = alice.post(ASYNC, body, format="json")

    assert response.status_code == 202, response.content


@override_settings(MESSAGING_MAX_JSON_DEPTH=4)
def test_it_reads_the_depth_limit_when_it_checks(alice: APIClient) -> None:
    error = assert_error(alice.post(ASYNC, {**VALID_REQUEST, "tool_context": [nested(5)]}, format="json"), 400, "invalid_request_error")

    assert error["errors"] == ["tool_context[0]: is nested more than 4 levels deep"]


@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
def test_it_refuses_invalid_utf8(alice: APIClient, url: str) -> None:
    body = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'

    error = assert_error(post_raw(alice, url, body), 400, "invalid_request_error")

    assert "UTF-8" in error["message"]


def test_it_refuses_a_lone_surrogate(alice: APIClient) -> None:
    body = '{"messages": [{"role": "user", "content": "\\ud800"}]}'

    assert_error(post_raw(alice, VALIDATE, body), 400, "invalid_request_error")


def test_it_reads_unicode_correctly(alice: APIClient) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Grüße, 東京 🌸"}]}, ensure_ascii=False).encode()

    response = post_raw(alice, VALIDATE, body)

    assert response.json()["valid"] is True


@pytest.mark.parametrize(
    ("body", "kind"),
    [("[]", "array"), ('"hello"', "string"), ("42", "number"), ("true", "boolean"), ("null", "null")],
)
def test_it_explains_a_json_body_that_is_not_an_object(alice: APIClient, body: str, kind: str) -> None:
    sentence = f"The request body must be a JSON object, not {kind}."

    validated = post_raw(alice, VALIDATE, body)
    accepted = post_raw(alice, ASYNC, body)

    assert validated.status_code == 200
    assert validated.json()["errors"] == [sentence]
    assert assert_error(accepted, 400, "invalid_request_error")["errors"] == [sentence]
    assert MessageJob.objects.count() == 0


@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "text/plain", "application/xml"],
)
def test_it_refuses_bodies_that_are_not_json_with_415(alice: APIClient, url: str, content_type: str) -> None:
    response = post_raw(alice, url, "messages=hello", content_type=content_type)

    error = assert_error(response, 415, "unsupported_media_type_error")
    assert content_type.split(";")[0] in error["message"]
    assert MessageJob.objects.count() == 0


def test_it_refuses_a_real_multipart_form(alice: APIClient) -> None:
    assert_error(alice.post(VALIDATE, {"messages": "hello"}, format="multipart"), 415, "unsupported_media_type_error")


def test_it_accepts_json_with_a_charset(alice: APIClient) -> None:
    response = post_raw(alice, VALIDATE, json.dumps(VALID_REQUEST), content_type="application/json; charset=utf-8")

    assert response.json()["valid"] is True


@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
@pytest.mark.parametrize(
    "body",
    ['{"messages": [{"role": "user", "content": "a\\u0000b"}]}', '{"messages": [{"role": "user", "content": "hi"}], "x\\u0000": 1}'],
    ids=["in a value", "in an unknown field's name"],
)
def test_it_refuses_a_nul_character_anywhere_in_the_body(alice: APIClient, url: str, body: str) -> None:
    # PostgreSQL's jsonb cannot store U+0000: /async answered 500 there, /validate said "valid".
    error = assert_error(post_raw(alice, url, body), 400, "invalid_request_error")

    assert error["message"] == "The request body contains the character U+0000 (NUL), which this service cannot store."
    assert MessageJob.objects.count() == 0


def test_it_accepts_a_quoted_backslash_u_0000_which_is_text(alice: APIClient) -> None:
    body = '{"messages": [{"role": "user", "content": "the escape \\\\u0000 in C"}]}'

    assert post_raw(alice, VALIDATE, body).json()["valid"] is True


# --- The size limit ---------------------------------------------------------------------------


@override_settings(MESSAGING_MAX_BODY_BYTES=1024)
@pytest.mark.parametrize("url", [VALIDATE, ASYNC])
def test_it_refuses_a_body_over_the_size_limit_with_413(alice: APIClient, url: str) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 1024}]})

    error = assert_error(post_raw(alice, url, body), 413, "request_too_large")

    assert error["message"] == "The request body is larger than 1024 bytes."
    assert MessageJob.objects.count() == 0


@override_settings(MESSAGING_MAX_BODY_BYTES=1024)
def test_it_accepts_a_body_of_exactly_the_size_limit(alice: APIClient) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": ""}]})
    body = body.replace('""', '"' + "x" * (1024 - len(body)) + '"')
    assert len(body.encode()) == 1024

    response = post_raw(alice, VALIDATE, body)

    assert response.status_code == 200
    assert response.json()["valid"] is True


# --- X-Request-ID -------------------------------------------------------------------------------


def every_kind_of_response(key: str, **headers: str) -> list[Any]:
    client, anonymous = APIClient(**headers), APIClient(**headers)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return [
        client.post(VALIDATE, VALID_REQUEST, format="json"),  # 200
        client.post(ASYNC, VALID_REQUEST, format="json"),  # 202
        post_raw(client, VALIDATE, "{"),  # 400
        anonymous.get("/v1/models"),  # 401
        client.get("/v1/messages/msg_missing"),  # 404 from a view
        client.get("/v1/no-such-route"),  # 404 from Django
        client.get(VALIDATE),  # 405
        post_raw(client, VALIDATE, "a=1", content_type="application/x-www-form-urlencoded"),  # 415
        client.get("/healthz"),  # outside the API
    ]


def test_every_response_carries_a_request_id(alice: APIClient) -> None:
    responses = every_kind_of_response(alice.api_key)  # type: ignore[attr-defined]

    assert [r.status_code for r in responses] == [200, 202, 400, 401, 404, 404, 405, 415, 200]
    ids = [r["X-Request-ID"] for r in responses]
    assert all(GENERATED_ID.match(request_id) for request_id in ids), ids
    assert len(set(ids)) == len(ids)


def test_it_echoes_a_sane_incoming_request_id(alice: APIClient) -> None:
    incoming = "client-42_retry.3:abc"

    responses = every_kind_of_response(alice.api_key, HTTP_X_REQUEST_ID=incoming)  # type: ignore[attr-defined]

    assert [r["X-Request-ID"] for r in responses] == [incoming] * len(responses)


@pytest.mark.parametrize(
    "incoming",
    ["has space", "new\\nline", "<script>", "x" * 129, "", "ünïcode", "semi;colon"],
)
def test_it_replaces_an_unsafe_incoming_request_id(alice: APIClient, incoming: str) -> None:
    response = alice.post(VALIDATE, VALID_REQUEST, format="json", HTTP_X_REQUEST_ID=incoming)

    assert GENERATED_ID.match(response["X-Request-ID"])


# --- Routes and methods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/v1/nothing"),
        ("post", "/v1/messages/msg_1/nothing"),
        ("get", "/v1/"),
        ("get", "/v2/messages"),
        ("get", "/nothing"),
    ],
)
def test_it_answers_an_unknown_route_with_404_in_the_error_shape(alice: APIClient, method: str, url: str) -> None:
    for client in (alice, APIClient()):
        error = assert_error(getattr(client, method)(url), 404, "not_found_error")
        assert url in error["message"]


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", VALIDATE),
        ("get", ASYNC),
        ("put", ASYNC),
        ("delete", "/v1/messages"),
        ("patch", "/v1/messages/msg_1"),
        ("delete", "/v1/messages/msg_1"),
        ("get", "/v1/messages/msg_1/cancel"),
        ("post", "/v1/models"),
    ],
)
def test_it_answers_a_wrong_method_with_405_in_the_error_shape(alice: APIClient, method: str, url: str) -> None:
    error = assert_error(getattr(alice, method)(url), 405, "method_not_allowed_error")

    assert method.upper() in error["message"]


# Every route's Allow header, for OPTIONS and for a 405, names every method it serves.
ROUTES = {
    "/v1/messages": "GET, HEAD, POST, OPTIONS",  # GET lists (DRF), POST runs a message (an async view)
    VALIDATE: "POST, OPTIONS",
    ASYNC: "POST, OPTIONS",
    "/v1/messages/msg_1": "GET, HEAD, OPTIONS",
    "/v1/messages/msg_1/stream": "GET, OPTIONS",
    "/v1/messages/msg_1/cancel": "POST, OPTIONS",
    "/v1/models": "GET, HEAD, OPTIONS",
}


@pytest.mark.parametrize(("url", "allowed"), ROUTES.items(), ids=ROUTES.keys())
def test_options_and_a_405_name_every_method_a_route_serves(alice: APIClient, url: str, allowed: str) -> None:
    # With CSRF checks on, as a real client meets them: no API route may answer with Django's HTML 403.
    client = APIClient(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {alice.api_key}")  # type: ignore[attr-defined]
    refused = "POST" if "POST" not in allowed else "GET" if "GET" not in allowed else "PUT"

    options = client.options(url)
    put = client.put(url)
    other = client.generic(refused, url)

    assert options.status_code == 200
    assert options["Allow"] == allowed
    for response in (put, other):
        assert_error(response, 405, "method_not_allowed_error")
        assert response["Allow"] == allowed


@pytest.mark.parametrize("url", ["/v1/messages/a%00b", "/v1/messages/a%00b/cancel"])
def test_a_message_id_that_cannot_exist_is_404_without_a_query(alice: APIClient, url: str) -> None:
    # PostgreSQL refuses a NUL in a query: that was a 500.
    method = alice.post if url.endswith("/cancel") else alice.get

    assert_error(method(url), 404, "not_found_error")


@pytest.mark.parametrize("message_id", ["order-42%0A", "order-42%0D%0A", "order-42%0Amore"])
def test_async_refuses_a_message_id_with_a_line_break(alice: APIClient, message_id: str) -> None:
    # `^...$` alone let "order-42\n" through, and the id goes into Location: the message was
    # stored and queued, then the answer was a 500.
    response = alice.post(f"{ASYNC}?message_id={message_id}", VALID_REQUEST, format="json")

    error = assert_error(response, 400, "invalid_request_error")
    assert error["message"].startswith("message_id: ")
    assert MessageJob.objects.count() == 0


# --- A crash ------------------------------------------------------------------------------------

SECRET = "db password is hunter2"


def crashing_view(request: HttpRequest) -> HttpResponse:
    raise RuntimeError(SECRET)


# This module doubles as a URLconf for the crash tests: one plain Django view that fails, beside
# the real routes, with the project's error handlers.
urlpatterns = [path("v1/crash", crashing_view), path("", include("project.urls"))]
handler404 = errors.page_not_found
handler500 = errors.server_error


def assert_no_traceback(response: Any) -> None:
    text = response.content.decode()
    for leak in ("Traceback", "RuntimeError", SECRET, ".py", "line "):
        assert leak not in text


def test_a_crash_in_a_view_is_500_api_error_without_a_traceback(
    alice: APIClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(views.ModelsView, "get", crash)
    alice.raise_request_exception = False

    response = alice.get("/v1/models")

    error = assert_error(response, 500, "api_error")
    assert error["message"] == "The service failed to handle this request."
    assert_no_traceback(response)
    assert GENERATED_ID.match(response["X-Request-ID"])
    # The operator still gets the whole story, tagged with the request id.
    assert SECRET in caplog.text


@pytest.mark.urls(__name__)
def test_a_crash_outside_rest_framework_is_500_api_error_without_a_traceback(anonymous: APIClient) -> None:
    anonymous.raise_request_exception = False

    response = anonymous.get("/v1/crash")

    error = assert_error(response, 500, "api_error")
    assert error["message"] == "The service failed to handle this request."
    assert_no_traceback(response)
    assert GENERATED_ID.match(response["X-Request-ID"])
