"""No regular expression or schema check runs in unbounded time (issue 7, item 1).

What a client sends is checked before it is stored, and a schema it sends is applied to the
model's answer, by echo and by the worker: each case below once held a process for seconds to
days (Python's `re` backtracking, with the GIL held, or a schema exponential through `$ref`s).
The timeouts are generous: the point is that the old code never finished, not a speed figure.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient

from messaging import runner
from messaging.models import APIKey, MessageJob
from tests.conftest import RUNS_THE_WORKER
from tests.processes import Server

VALIDATE = "/v1/messages/validate"
ASYNC = "/v1/messages/async"

# The base64 check's worst case, as large as the 4 MiB body limit allows: "A", spaces, "!".
WORST_BASE64 = "A" + " " * 4_000_000 + "!"
# Python's `re` needs about 2**n steps to find that n a's and a "!" do not match ^(a+)+$.
NESTED_QUANTIFIERS = "^(a+)+$"
BACKTRACKING_BAIT = "a" * 40 + "!"


def image_request(data: str) -> dict[str, Any]:
    source = {"type": "base64", "media_type": "image/png", "data": data}
    return {"messages": [{"role": "user", "content": [{"type": "image", "source": source}]}]}


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def validate(client: APIClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(VALIDATE, json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    return dict(response.json())


def output_problem(schema: Any, answer: Any) -> str | None:
    """What the worker says about `answer`, given as the model's text, under `schema`."""
    request = {"response_format": json_format(schema)}
    result = {"content": [{"type": "text", "text": json.dumps(answer)}], "stop_reason": "end_turn"}
    return runner.output_problem(request, result)


# --- base64 ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_base64_worst_case_of_four_megabytes_is_refused_at_once(alice: APIClient) -> None:
    assert validate(alice, image_request(WORST_BASE64))["errors"] == ["messages[0].content[0].source.data: is not base64"]


@pytest.mark.parametrize("data", ["iVBORw0KGgo=", "iVBO Rw0K\nGgo=\n", " iVBORw0KGgoAAAAN "])
def test_base64_with_whitespace_anywhere_is_accepted(alice: APIClient, data: str) -> None:
    assert validate(alice, image_request(data))["valid"] is True


@pytest.mark.parametrize("data", ["not base64!", "iVBORw0KGgo", "iVBO=Rw0KGgo=", "iVBORw0KGgo=é"])
def test_what_is_not_base64_is_refused(alice: APIClient, data: str) -> None:
    assert validate(alice, image_request(data))["errors"] == ["messages[0].content[0].source.data: is not base64"]


# --- patterns at validation ----------------------------------------------------------------------


def tool_with(schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": "lookup", "input_schema": {"type": "object", **schema}}


def test_a_pattern_with_nested_quantifiers_is_accepted_in_either_place(alice: APIClient) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": NESTED_QUANTIFIERS}}}
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": json_format(schema),
        "tools": [tool_with({"patternProperties": {NESTED_QUANTIFIERS: {"type": "string"}}})],
    }

    assert validate(alice, body)["errors"] == []


LINEAR_TIME = "patterns run on a linear-time engine (RE2), without backreferences or lookaround"
REFUSED_PATTERNS = {
    "a backreference in response_format": (
        {"response_format": json_format({"type": "object", "properties": {"x": {"type": "string", "pattern": r"^(a)\1$"}}})},
        rf'response_format.json_schema.schema: pattern "^(a)\1$" at properties.x uses a backreference, which this service does not support; {LINEAR_TIME}',
    ),
    "lookahead in a tool's patternProperties": (
        {"tools": [tool_with({"properties": {"tags": {"type": "object", "patternProperties": {"^(?!x-)": {}}}}})]},
        f'tools[0].input_schema: patternProperties key "^(?!x-)" at properties.tags uses lookaround, which this service does not support; {LINEAR_TIME}',
    ),
    "lookbehind at the top of a schema": (
        {"response_format": json_format({"type": "string", "pattern": "(?<=a)b"})},
        f'response_format.json_schema.schema: pattern "(?<=a)b" uses lookaround, which this service does not support; {LINEAR_TIME}',
    ),
    "a repetition RE2 does not allow": (
        {"response_format": json_format({"type": "string", "pattern": "^(a{1000}){1000}$"})},
        "response_format.json_schema.schema: pattern \"^(a{1000}){1000}$\" is not one this service can run "
        f"(RE2 says: invalid repetition size: {{1000}}); {LINEAR_TIME}",
    ),
}


@pytest.mark.parametrize("fields, error", REFUSED_PATTERNS.values(), ids=REFUSED_PATTERNS.keys())
def test_a_pattern_re2_cannot_run_is_refused_with_where_and_why(alice: APIClient, fields: dict[str, Any], error: str) -> None:
    assert validate(alice, {"messages": [{"role": "user", "content": "hi"}], **fields})["errors"] == [error]


@pytest.mark.timeout(30)
def test_a_schema_too_large_to_check_is_refused_within_its_budget(alice: APIClient) -> None:
    # 20,000 subschemas: the metaschema check took 4 s of a web process.
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": json_format({"anyOf": [{"type": "string"}] * 20_000})}

    assert validate(alice, body)["errors"] == [
        "response_format.json_schema.schema: is too large or complex for this service: checking it takes more than 150,000 steps"
    ]


# --- the model's answer, checked by the worker ---------------------------------------------------


@pytest.mark.timeout(30)
def test_an_answer_is_checked_against_nested_quantifiers_in_linear_time() -> None:
    problem = output_problem({"type": "string", "pattern": NESTED_QUANTIFIERS}, BACKTRACKING_BAIT)

    assert problem == f"The model's answer does not match response_format's schema: '{BACKTRACKING_BAIT}' does not match \"^(a+)+$\""


@pytest.mark.timeout(30)
def test_a_subschema_naming_its_own_dialect_is_checked_on_the_same_engine() -> None:
    # jsonschema hands a subschema with a `$schema` to its stock validator, which uses `re`.
    schema = {"type": "object", "properties": {"x": {"$schema": "http://json-schema.org/draft-07/schema#", "pattern": NESTED_QUANTIFIERS}}}

    assert "does not match" in (output_problem(schema, {"x": BACKTRACKING_BAIT}) or "")


@pytest.mark.timeout(30)
def test_patterns_in_patternproperties_and_additionalproperties_run_on_re2() -> None:
    schema = {"type": "object", "patternProperties": {NESTED_QUANTIFIERS: {"type": "integer"}}, "additionalProperties": False}

    assert output_problem(schema, {BACKTRACKING_BAIT: 1}) == (
        "The model's answer does not match response_format's schema: Additional properties are not allowed "
        f"(['{BACKTRACKING_BAIT}'] unexpected)"
    )


@pytest.mark.timeout(30)
def test_unique_items_are_checked_in_linear_time() -> None:
    # jsonschema compares every pair of objects: 100,000 of them took minutes.
    answer = [{"n": number} for number in range(100_000)] + [{"n": 7}]

    assert output_problem({"type": "array", "uniqueItems": True}, answer) == (
        "The model's answer does not match response_format's schema: "
        "[{'n': 0}, {'n': 1}, {'n': 2}, {'n': 3}, {'n': 4}, {'n': 5}, ...] has non-unique elements"
    )


def exponential_schema(levels: int) -> dict[str, Any]:
    """Each level refers twice to the next: 1.5 KB of schema, 2**levels checks."""
    defs: dict[str, Any] = {f"l{n}": {"allOf": [{"$ref": f"#/$defs/l{n + 1}"}, {"$ref": f"#/$defs/l{n + 1}"}]} for n in range(levels)}
    defs[f"l{levels}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


@pytest.mark.timeout(60)
def test_a_schema_exponential_through_refs_is_given_up_within_its_budget() -> None:
    assert output_problem(exponential_schema(40), 1) == (
        "The model's answer could not be checked against response_format's schema: checking it takes more than 300,000 steps."
    )


def test_a_ref_to_something_that_is_not_a_schema_is_reported_not_a_crash() -> None:
    # The metaschema checks every place a schema belongs; a $ref can point anywhere else.
    problem = output_problem({"$ref": "#/required", "required": ["a"]}, {"a": 1})

    assert problem == (
        "The model's answer could not be checked against response_format's schema: "
        "a $ref leads to something that is not a valid schema (AttributeError)."
    )


def test_an_answer_nested_too_deeply_to_read_is_a_failure_not_a_crash() -> None:
    request = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}}
    result = {"stop_reason": "end_turn", "content": [{"type": "text", "text": "[" * 100_000 + "]" * 100_000}]}

    assert runner.output_problem(request, result) == "The model's answer is JSON nested too deeply to read."


class Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        Recorder.hits.append(self.path)
        body = b'{"type": "integer"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def schema_host() -> Iterator[str]:
    Recorder.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_remote_ref_is_never_fetched(schema_host: str) -> None:
    # jsonschema's default registry fetches it, with no timeout, from wherever it points.
    problem = output_problem({"$ref": f"{schema_host}/schema.json"}, 1)

    assert problem == (
        f"The model's answer could not be checked against response_format's schema: $ref \"{schema_host}/schema.json\" "
        "does not lead to a part of the schema (remote references are not fetched)."
    )
    assert Recorder.hits == []


# --- echo and the worker, end to end in this process --------------------------------------------

# Two ways a pattern met a long string: the worker checking echo's answer (the user's text goes
# into the free string, which must *not* match), and echo vetting a `default` before using it.
PATTERN_RUNS = {
    "the worker checks the answer": (
        {"response_format": json_format({"type": "object", "properties": {"answer": {"type": "string", "not": {"pattern": NESTED_QUANTIFIERS}}}, "required": ["answer"]})},
        {"type": "text", "text": json.dumps({"answer": BACKTRACKING_BAIT}, separators=(",", ":"))},
    ),
    "echo vets a default": (
        {
            "tools": [tool_with({"properties": {"q": {"type": "string", "default": BACKTRACKING_BAIT, "pattern": NESTED_QUANTIFIERS}}, "required": ["q"]})],
            "tool_choice": {"type": "any"},
        },
        {"type": "tool_use", "name": "lookup", "input": {"q": "a"}},
    ),
}


@RUNS_THE_WORKER
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fields, block", PATTERN_RUNS.values(), ids=PATTERN_RUNS.keys())
def test_a_message_with_a_nested_quantifier_pattern_runs_promptly(alice: APIClient, fields: dict[str, Any], block: dict[str, Any]) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": BACKTRACKING_BAIT}], **fields}
    message_id = alice.post(ASYNC, body, format="json").json()["message_id"]

    assert runner.run_one() == message_id

    state = alice.get(f"/v1/messages/{message_id}").json()
    assert state["status"] == "completed", state["error"]
    [produced] = state["result"]["content"]
    assert {key: produced[key] for key in block} == block


@RUNS_THE_WORKER
@pytest.mark.timeout(60)
def test_a_schema_asking_for_a_hundred_million_characters_stores_a_small_result(alice: APIClient) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000_000}}, "required": ["text"]}
    body = {"model": "echo", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], "response_format": json_format(schema)}
    message_id = alice.post(ASYNC, body, format="json").json()["message_id"]

    runner.run_one()

    job = MessageJob.objects.get(message_id=message_id)
    assert job.status == "completed"  # cut short, like a real model's answer: not checked
    assert job.result["stop_reason"] == "max_tokens"
    assert job.result["usage"]["output_tokens"] == 100
    assert len(job.result["content"][0]["text"]) == 100 * 64


# --- a real server: /healthz answers meanwhile ----------------------------------------------------


@pytest.fixture
def key(transactional_db: None) -> str:
    return APIKey.objects.create_key(name="alice", owner="alice")[1]


@pytest.mark.e2e
def test_healthz_answers_while_the_four_megabyte_base64_worst_case_is_validated(start_server: Any, key: str) -> None:
    server: Server = start_server()
    body = json.dumps(image_request(WORST_BASE64)).encode()
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            answers.append(http.post(VALIDATE, content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))

    # Two at once, each a thread of the same web process: the old check held the GIL for days.
    senders = [threading.Thread(target=send, daemon=True) for _ in range(2)]
    for sender in senders:
        sender.start()
    # Generous: they take a fraction of a second; the old check needed days.
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=server.url, timeout=5) as http:
        while True:
            assert http.get("/healthz").status_code == 200
            if not any(sender.is_alive() for sender in senders):
                break
            assert time.monotonic() < deadline, "the validation requests did not finish within 30 seconds"
            senders[0].join(timeout=0.05)

    assert [answer.status_code for answer in answers] == [200, 200]
    assert all(answer.json()["errors"] == ["messages[0].content[0].source.data: is not base64"] for answer in answers)


@pytest.mark.e2e
@pytest.mark.parametrize("fields, block", PATTERN_RUNS.values(), ids=PATTERN_RUNS.keys())
def test_the_synchronous_endpoint_answers_promptly_against_nested_quantifiers(
    start_server: Any, key: str, fields: dict[str, Any], block: dict[str, Any]
) -> None:
    server: Server = start_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": BACKTRACKING_BAIT}], **fields}

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        response = http.post("/v1/messages", json=body)

    assert response.status_code == 200, response.text
    [produced] = response.json()["content"]
    assert {key: produced[key] for key in block} == block
    assert MessageJob.objects.get(message_id=response.headers["x-message-id"]).status == "completed"
