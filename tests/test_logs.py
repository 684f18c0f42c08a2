"""Structured logs: LOG_FORMAT=json writes one JSON object per line, from the web and the worker
alike. Each request logs one access line; each message logs its life (accepted, claimed, every
upstream attempt and its outcome, finished) with its message_id, correlation_id and the
request_id of the request that sent it, so one correlation_id finds it everywhere. No secret
appears: the API key, the model provider's key, an MCP server's token, the tool_context.

In-process tests capture the records with the formatter settings.LOGGING gives LOG_FORMAT=json
(the runner runs in this process: `runner.run_one`); the end-to-end test reads what a real
server and worker started with LOG_FORMAT=json wrote.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings
from rest_framework.test import APIClient

from messaging import catalog, runner
from messaging.middleware import RequestIDLogFilter, log_fields, message_context
from messaging.models import APIKey, MessageJob, Status
from tests.conftest import RUNS_THE_WORKER
from tests.mcp_servers import TOKEN, McpServer, mcp_guarded  # noqa: F401 (a fixture)
from tests.processes import wait_until
from tests.test_deploy import manage
from tests.test_provider_openai import KEY_ENV
from tests.test_provider_openai import model as openai_model
from tests.upstreams import OpenAIUpstream, error_reply, openai_upstream, streamed, text_stream, tool_stream  # noqa: F401 (a fixture)

UPSTREAM_KEY = "sk-upstream-canary-5b1e09"
CONTEXT_CANARY = "tool-context-canary-c4d9"
CORRELATION_ID = "order-42"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter LOG_FORMAT=`log_format` gets, built from settings.LOGGING as dictConfig builds it."""
    spec = dict(settings.LOGGING["formatters"][log_format])
    return logging.config.DictConfigurator(settings.LOGGING).configure_formatter(spec)  # type: ignore[no-any-return]


class Captured:
    """What the service logged, as LOG_FORMAT=json writes it."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def json_logs() -> Iterator[Captured]:
    captured = Captured()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(formatter("json"))
    handler.addFilter(RequestIDLogFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # everything anyone logs, at every level, is searched for secrets
    yield captured
    root.removeHandler(handler)
    root.setLevel(level)


def key_for(owner: str) -> str:
    _, key = APIKey.objects.create_key(name=owner, owner=owner)
    return key


def secret_request(mcp: McpServer, model: str) -> dict[str, Any]:
    """A request with a secret in every field that holds one."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Where is order 42?"}],
        "correlation_id": CORRELATION_ID,
        "mcp_servers": [{"type": "url", "url": mcp.url, "name": "orders", "authorization_token": TOKEN}],
        "tool_context": [{"type": "note", "text": f"the customer's notes {CONTEXT_CANARY}"}],
    }


def local_model_answers_after_a_retry(upstream: OpenAIUpstream) -> None:
    """503 first (repeating our key, as some proxies do), then a call to the MCP tool, then text."""
    upstream.script(
        error_reply(503, f"overloaded; key {UPSTREAM_KEY} is queued", error_type="overloaded_error"),
        streamed(tool_stream(("call_1", "lookup", ['{"key": "k"}']))),
        streamed(text_stream("It is shipped.")),
    )


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in (UPSTREAM_KEY, TOKEN, CONTEXT_CANARY, *secrets):
        assert secret not in text, f"{secret!r} was logged"


@pytest.fixture
def open_policy(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test MCP servers are on loopback, which production refuses.
    settings.MESSAGING_MCP_ALLOW_PRIVATE = True
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)


# --- in this process ---------------------------------------------------------------------------


@RUNS_THE_WORKER
def test_a_message_logs_its_life_with_its_ids_and_no_secret(
    json_logs: Captured, open_policy: None, openai_upstream: OpenAIUpstream, mcp_guarded: McpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream, retry_base_delay=0.01, retry_max_delay=0.02))
    local_model_answers_after_a_retry(openai_upstream)
    key = key_for("alice")
    client = APIClient(HTTP_AUTHORIZATION=f"Bearer {key}", HTTP_X_REQUEST_ID="req-logs-1")

    response = client.post("/v1/messages/async?message_id=order-42-try-1", secret_request(mcp_guarded, "local-model"), format="json")
    assert response.status_code == 202, response.content
    assert runner.run_one() == "order-42-try-1"

    assert MessageJob.objects.get().status == Status.COMPLETED
    assert mcp_guarded.seen.calls == {"lookup": 1}  # the token and the context were used
    assert_no_secret(json_logs.text, key, key.partition(".")[2])
    # Nor where the model server is: the operator's internal host and port.
    port = urlsplit(openai_upstream.base_url).port
    assert f"127.0.0.1:{port}" not in json_logs.text and f"port={port}" not in json_logs.text
    lines = json_logs.lines()  # every line is one JSON object
    [access] = [line for line in lines if line.get("event") == "request"]
    assert access["request_id"] == "req-logs-1"
    assert {name: access[name] for name in ("logger", "level", "owner", "method", "path", "status")} == {
        "logger": "messaging.access", "level": "INFO", "owner": "alice", "method": "POST", "path": "/v1/messages/async", "status": 202,
    }
    assert access["duration_ms"] >= 0 and "time" in access

    life = [line for line in lines if line.get("message_id") == "order-42-try-1"]
    for line in life:  # every line about the message, the provider's retry included
        assert (line["correlation_id"], line["request_id"]) == (CORRELATION_ID, "req-logs-1"), line
    steps = [(line["event"], line.get("attempt") or line.get("outcome")) for line in life if "event" in line]
    assert steps == [
        ("accepted", None), ("claimed", 1),
        ("upstream_attempt", None), ("upstream_outcome", "retry"),
        ("upstream_attempt", None), ("upstream_outcome", "ok"),
        ("upstream_attempt", None), ("upstream_outcome", "ok"),
        ("finished", 1),
    ]
    retry = next(line for line in life if line.get("outcome") == "retry")
    assert (retry["upstream_status"], retry["provider"], retry["model"], retry["upstream_attempt"]) == (503, "openai", "local-model", 1)
    assert "[redacted]" in retry["message"]  # the key the upstream repeated
    assert life[-1]["message_status"] == "completed"


@RUNS_THE_WORKER
def test_every_request_logs_one_access_line(json_logs: Captured) -> None:
    key = key_for("alice")
    alice = APIClient(HTTP_AUTHORIZATION=f"Bearer {key}")
    body = {"messages": [{"role": "user", "content": "one two"}], "correlation_id": CORRELATION_ID}

    answers = {
        "models": alice.get("/v1/models"),
        "no key": APIClient().get("/v1/models"),
        "list": alice.get("/v1/messages?limit=1&correlation_id=order-42"),
        "sync": alice.post("/v1/messages", body, format="json"),
        "health": alice.get("/healthz"),
    }
    message_id = answers["sync"]["X-Message-ID"]
    # (A stream's line, written when it closes, is checked against a real server below.)

    lines = json_logs.lines()
    access = {line["request_id"]: line for line in lines if line.get("event") == "request"}
    assert len(access) == len([line for line in lines if line.get("event") == "request"]) == len(answers)
    seen = {name: access[answer["X-Request-ID"]] for name, answer in answers.items()}
    assert {name: (line["method"], line["path"], line["status"], line["owner"]) for name, line in seen.items()} == {
        "models": ("GET", "/v1/models", 200, "alice"),
        "no key": ("GET", "/v1/models", 401, "-"),
        "list": ("GET", "/v1/messages", 200, "alice"),  # never the query string
        "sync": ("POST", "/v1/messages", 200, "alice"),
        "health": ("GET", "/healthz", 200, "-"),  # no key asked, none read
    }
    # The synchronous message ran on this web process: its life carries its request's id.
    sync_request_id = answers["sync"]["X-Request-ID"]
    life = [line for line in lines if line.get("message_id") == message_id and "event" in line]
    assert [line["event"] for line in life] == ["accepted", "claimed", "finished"]
    assert {(line["correlation_id"], line["request_id"]) for line in life} == {(CORRELATION_ID, sync_request_id)}
    assert_no_secret(json_logs.text, key)


def test_the_plain_format_shows_a_message_s_ids_after_the_text() -> None:
    job = MessageJob(message_id="msg_1", correlation_id="order 42", request_id="req-7")
    plain = formatter("plain")
    inside = logging.LogRecord("messaging.providers.http", logging.WARNING, __file__, 1, "message %s: overloaded; trying again", ("msg_1",), None)
    message_context(job).run(RequestIDLogFilter().filter, inside)
    given = logging.LogRecord("messaging.jobs", logging.INFO, __file__, 1, "message %s accepted", ("msg_1",), None)
    given.__dict__.update(log_fields(job, event="accepted"))
    RequestIDLogFilter().filter(given)
    outside = logging.LogRecord("messaging.access", logging.INFO, __file__, 1, "GET /healthz 200", (), None)
    RequestIDLogFilter().filter(outside)

    assert plain.format(inside).endswith(' WARNING messaging.providers.http [req-7] message msg_1: overloaded; trying again message_id=msg_1 correlation_id="order 42"')
    assert plain.format(given).endswith(' INFO messaging.jobs [req-7] message msg_1 accepted message_id=msg_1 correlation_id="order 42"')
    assert plain.format(outside).endswith(" INFO messaging.access [-] GET /healthz 200")


def test_a_bad_log_format_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    result = manage({"DATA_DIR": str(tmp_path), "DEBUG": "1", "LOG_FORMAT": "xml"}, "check")

    assert result.returncode != 0
    assert "ImproperlyConfigured: LOG_FORMAT must be plain or json, not 'xml'" in result.stderr


# --- real processes ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_real_server_and_worker_write_json_lines_that_one_correlation_id_follows(
    start_server: Any, start_cluster: Any, openai_upstream: OpenAIUpstream, mcp_guarded: McpServer, tmp_path: Path
) -> None:
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        '[models."local-model"]\nprovider = "openai"\n'
        f'base_url = "{openai_upstream.base_url}"\napi_key_env = "{KEY_ENV}"\n'
        "max_tokens = 4096\nretry_base_delay = 0.01\nretry_max_delay = 0.02\n"
    )
    environment = {"LOG_FORMAT": "json", "MESSAGING_MODELS_FILE": str(models_file), KEY_ENV: UPSTREAM_KEY, "MESSAGING_MCP_ALLOW_PRIVATE": "true"}
    server = start_server(**environment)
    cluster = start_cluster(**environment)
    local_model_answers_after_a_retry(openai_upstream)
    key = key_for("alice")

    response = httpx.post(server.url + "/v1/messages/async", json=secret_request(mcp_guarded, "local-model"), headers={"x-api-key": key}, timeout=10)
    assert response.status_code == 202, response.text
    message_id, request_id = response.json()["message_id"], response.headers["X-Request-ID"]

    def worker_lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in cluster.log().splitlines()]

    wait_until(lambda: any(line.get("event") == "finished" for line in worker_lines()), timeout=20, what=f"the finished line; log:\n{cluster.log()}")
    with httpx.stream("GET", f"{server.url}/v1/messages/{message_id}/stream", headers={"x-api-key": key}, timeout=10) as stream:
        assert b"".join(stream.iter_bytes()).count(b"event: status") == 3  # replayed to its end, then closed
        stream_request_id = stream.headers["X-Request-ID"]
    server.stop()  # its last lines written
    web = [json.loads(line) for line in server.log().splitlines()]  # every line of both is JSON
    worker = worker_lines()

    def found(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # What a search for the correlation_id finds.
        return [line for line in lines if line.get("correlation_id") == CORRELATION_ID]

    assert [(line["event"], line["message_id"], line["request_id"]) for line in found(web)] == [("accepted", message_id, request_id)]
    # In the worker, every line about the message (an MCP server's warning too) names it and
    # the request that sent it.
    assert {(line["message_id"], line["request_id"]) for line in found(worker)} == {(message_id, request_id)}
    assert [line["event"] for line in found(worker) if "event" in line] == [
        "claimed", "upstream_attempt", "upstream_outcome", "upstream_attempt", "upstream_outcome",
        "upstream_attempt", "upstream_outcome", "finished",
    ]
    [access] = [line for line in web if line.get("path") == "/v1/messages/async"]
    assert (access["event"], access["request_id"], access["owner"], access["status"]) == ("request", request_id, "alice", 202)
    # A stream's access line is written when it closes, with the owner the streaming view found.
    [streamed] = [line for line in web if line.get("path") == f"/v1/messages/{message_id}/stream"]
    assert (streamed["event"], streamed["request_id"], streamed["owner"], streamed["status"]) == ("request", stream_request_id, "alice", 200)
    assert_no_secret(server.log() + cluster.log(), key)
