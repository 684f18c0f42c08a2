"""Tools on the server: `mcp_servers` and `tool_context`, against real MCP servers.

The servers (tests/mcp_servers.py) are the `mcp` package's own `MCPServer` over HTTP on
loopback, so the outbound policy is opened for private addresses here, in the tests only. Each
message is accepted as the API accepts it and run by the runner in this process
(`runner.run_one`), with the built-in `echo` model or the `openai` and `anthropic` providers
against local servers speaking their wire protocols. The worker path (a real `qcluster`, a
SIGKILL, a cancel) is in tests/test_mcp_worker.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from messaging import catalog, jobs, outbound, runner, toolloop
from messaging.events import build_result
from messaging.models import MessageJob, Status
from messaging.providers.echo import estimate_tokens
from messaging.serializers import check_request
from tests import aio
from tests.processes import wait_until
from tests.mcp_servers import TOKEN, McpServer, Seen, context_digest, serve, mcp_guarded, mcp_legacy, mcp_tools  # noqa: F401 (fixtures)
from tests.test_provider_anthropic import KEY_ENV as ANTHROPIC_KEY_ENV
from tests.test_provider_anthropic import model as anthropic_model
from tests.test_provider_openai import KEY_ENV as OPENAI_KEY_ENV
from tests.test_provider_openai import model as openai_model
from tests.upstreams import (
    AnthropicUpstream,
    OpenAIUpstream,
    anthropic_block,
    anthropic_end,
    anthropic_start,
    anthropic_streamed,
    anthropic_text_stream,
    anthropic_upstream,  # noqa: F401 (a fixture)
    openai_upstream,  # noqa: F401 (a fixture)
    streamed,
    text_stream,
    tool_stream,
)

CONTEXT_CANARY = "tool-context-canary-91c2"
TOOL_CONTEXT = [{"type": "document", "text": f"the customer's notes {CONTEXT_CANARY}"}]

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def open_policy(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test servers are on loopback, which production refuses.
    settings.MESSAGING_MCP_ALLOW_PRIVATE = True
    settings.MESSAGING_MCP_TIMEOUT = 5.0
    monkeypatch.setenv(OPENAI_KEY_ENV, "sk-openai-test")
    monkeypatch.setenv(ANTHROPIC_KEY_ENV, "sk-ant-test")


def server(mcp: McpServer, name: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"type": "url", "url": mcp.url, "name": name or mcp.name, **fields}


def run(text: str = "look it up", **fields: Any) -> MessageJob:
    """Accept a message as POST /v1/messages/async does, and run it to its end here."""
    body = {"messages": [{"role": "user", "content": text}], **fields}
    checked = check_request(body, endpoint="async")
    assert checked.valid, checked.errors
    job, _ = jobs.accept("alice", checked)
    assert runner.run_one() == job.message_id
    job.refresh_from_db()
    return job


def service_logs(caplog: pytest.LogCaptureFixture) -> str:
    """What the service logged, at every level (the test MCP servers log in this process too)."""
    theirs = ("sse_starlette", "mcp.server", "uvicorn", "starlette")
    return "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records if not record.name.startswith(theirs))


def events(job: MessageJob) -> list[dict[str, Any]]:
    return list(job.events.order_by("sequence").values_list("data", flat=True))


def blocks(job: MessageJob) -> list[str]:
    assert job.result is not None
    return [block["type"] for block in job.result["content"]]


def final_text(job: MessageJob) -> str:
    assert job.result is not None
    return "".join(block.get("text", "") for block in job.result["content"] if block["type"] == "text")


# --- the loop with echo -----------------------------------------------------------------------------


def test_echo_calls_the_tool_and_answers_with_its_result(mcp_tools: McpServer) -> None:
    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["lookup"]})], tool_choice={"type": "any"}, stream=True)

    assert job.status == Status.COMPLETED, job.error
    assert mcp_tools.seen.calls == {"lookup": 1}
    use, result, text = job.result["content"]
    assert use == {"type": "mcp_tool_use", "id": use["id"], "name": "lookup", "server_name": "tools", "input": {"key": use["input"]["key"]}}
    assert result == {
        "type": "mcp_tool_result",
        "tool_use_id": use["id"],
        "is_error": False,
        "content": [{"type": "text", "text": f"the value of {use['input']['key']} is 42"}],
    }
    assert text == {"type": "text", "text": f"the value of {use['input']['key']} is 42"}
    assert job.result["stop_reason"] == "end_turn"

    # One message on the stream: one start, the blocks in order, one end.
    stream = [event for event in events(job) if event["type"] != "status"]
    kinds = [(event["type"], event.get("index"), (event.get("content_block") or {}).get("type")) for event in stream]
    assert kinds[0] == ("message_start", None, None)
    assert [kind for kind in kinds if kind[0] == "content_block_start"] == [
        ("content_block_start", 0, "mcp_tool_use"),
        ("content_block_start", 1, "mcp_tool_result"),
        ("content_block_start", 2, "text"),
    ]
    assert [kind[0] for kind in kinds[-2:]] == ["message_delta", "message_stop"]
    # Usage adds up both model calls: the second was sent the first's call and its result.
    usage = job.result["usage"]
    first_call = estimate_tokens(toolloop.model_request(job.request, tools=[{"name": "lookup", "input_schema": {}}]))
    assert usage["input_tokens"] > stream[0]["message"]["usage"]["input_tokens"] >= first_call - 20
    # echo spends one token per delta, in either call.
    assert usage["output_tokens"] == sum(1 for event in stream if event["type"] == "content_block_delta")


def test_tool_context_reaches_the_tool_and_nothing_else(mcp_tools: McpServer, caplog: pytest.LogCaptureFixture, admin_client: Any) -> None:
    caplog.set_level(logging.DEBUG)
    job = run(
        mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["context"]})],
        tool_choice={"type": "tool", "name": "context"},
        tool_context=TOOL_CONTEXT,
        stream=True,
    )

    assert job.status == Status.COMPLETED, job.error
    assert mcp_tools.seen.tool_contexts == [TOOL_CONTEXT]
    assert final_text(job) == f"tool_context digest: {context_digest(TOOL_CONTEXT)}"
    assert CONTEXT_CANARY not in json.dumps(events(job)) + json.dumps(job.result) + json.dumps(job.request)
    assert CONTEXT_CANARY not in service_logs(caplog)
    for page in (f"/admin/messaging/messagejob/{job.pk}/change/", "/admin/messaging/messagejob/"):
        response = admin_client.get(page)
        assert response.status_code == 200
        assert CONTEXT_CANARY not in response.content.decode()


def test_tool_context_is_never_sent_to_the_model(mcp_tools: McpServer, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream))
    openai_upstream.script(streamed(tool_stream(("call_1", "lookup", ['{"key": "k"}']))), streamed(text_stream("done")))

    job = run(model="local-model", mcp_servers=[server(mcp_tools)], tool_context=TOOL_CONTEXT)

    assert job.status == Status.COMPLETED, job.error
    assert len(openai_upstream.requests) == 2
    for request in openai_upstream.requests:
        assert CONTEXT_CANARY not in json.dumps(request.body)
        assert "mcp_servers" not in request.body


def test_the_token_goes_to_its_server_and_nowhere_else(mcp_guarded: McpServer, caplog: pytest.LogCaptureFixture, admin_client: Any) -> None:
    caplog.set_level(logging.DEBUG)
    job = run(mcp_servers=[server(mcp_guarded, authorization_token=TOKEN)], tool_choice={"type": "tool", "name": "lookup"})

    assert job.status == Status.COMPLETED, job.error
    assert mcp_guarded.seen.calls == {"lookup": 1}
    assert set(mcp_guarded.seen.authorizations) == {f"Bearer {TOKEN}"}
    assert TOKEN not in json.dumps(events(job)) + json.dumps(job.request) + service_logs(caplog)
    page = admin_client.get(f"/admin/messaging/messagejob/{job.pk}/change/")
    assert TOKEN not in page.content.decode()


def test_a_server_that_refuses_the_token_fails_the_message_naming_it(mcp_guarded: McpServer) -> None:
    job = run(mcp_servers=[server(mcp_guarded, name="crm", authorization_token="wrong-token-canary")], tool_choice={"type": "any"})

    assert job.status == Status.FAILED
    assert job.error == {"type": "mcp_error", "message": 'MCP server "crm" refused the authorization (HTTP 401)'}
    assert mcp_guarded.seen.calls == {}
    assert "wrong-token-canary" not in json.dumps(events(job))


def test_an_unreachable_server_fails_the_message_naming_it(mcp_tools: McpServer) -> None:
    url = mcp_tools.url
    mcp_tools.stop()

    job = run(mcp_servers=[{"type": "url", "url": url, "name": "gone"}])

    assert job.status == Status.FAILED
    assert job.error["type"] == "mcp_error"
    assert job.error["message"].startswith('MCP server "gone" could not be used: ConnectError')


def test_a_server_that_speaks_only_the_older_sse_transport_still_works(mcp_legacy: McpServer) -> None:
    job = run(mcp_servers=[server(mcp_legacy)], tool_choice={"type": "tool", "name": "lookup"})

    assert job.status == Status.COMPLETED, job.error
    assert mcp_legacy.seen.calls == {"lookup": 1}
    assert blocks(job) == ["mcp_tool_use", "mcp_tool_result", "text"]


def test_allowed_tools_and_disabled_servers_are_honoured(mcp_tools: McpServer, mcp_guarded: McpServer) -> None:
    job = run(
        mcp_servers=[
            server(mcp_tools, tool_configuration={"allowed_tools": ["context", "fail"]}),
            server(mcp_guarded, tool_configuration={"enabled": False}),
        ],
        tool_choice={"type": "any"},
    )

    assert job.status == Status.COMPLETED, job.error
    # echo calls the first tool offered: "lookup", the server's first, was not.
    assert mcp_tools.seen.calls == {"context": 1}
    assert mcp_guarded.seen.authorizations == []


@pytest.mark.parametrize("clash", ["two servers", "the request's tools"])
def test_two_tools_with_one_name_fail_the_message_clearly(mcp_tools: McpServer, clash: str) -> None:
    fields: dict[str, Any] = {"mcp_servers": [server(mcp_tools, name="a")]}
    if clash == "two servers":
        fields["mcp_servers"].append(server(mcp_tools, name="b"))
        other = 'as MCP server "a" does'
    else:
        fields["tools"] = [{"name": "lookup", "input_schema": {"type": "object"}}]
        other = "as the request's tools does"

    job = run(**fields)

    assert job.status == Status.FAILED
    assert job.error["type"] == "mcp_error"
    assert 'offers a tool named "lookup"' in job.error["message"] and other in job.error["message"]
    assert mcp_tools.seen.calls == {}


def test_a_failing_tool_is_an_error_result_the_model_sees(mcp_tools: McpServer) -> None:
    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["fail"]})], tool_choice={"type": "any"})

    assert job.status == Status.COMPLETED, job.error
    _, result, text = job.result["content"]
    assert result["is_error"] is True
    assert "fail" in result["content"][0]["text"]
    assert text["text"] == result["content"][0]["text"]


def test_a_tool_past_its_timeout_is_an_error_result(mcp_tools: McpServer, settings: Any) -> None:
    settings.MESSAGING_MCP_TIMEOUT = 0.5

    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["slow"]})], tool_choice={"type": "any"})

    assert job.status == Status.COMPLETED, job.error
    result = job.result["content"][1]
    assert result["is_error"] is True
    assert result["content"] == [{"type": "text", "text": "The tool slow did not answer within 0.5 seconds."}]
    assert mcp_tools.seen.calls == {"slow": 1}


def test_a_result_over_the_limit_is_an_error_result(mcp_tools: McpServer, settings: Any) -> None:
    settings.MESSAGING_MCP_MAX_RESULT_BYTES = 4096
    mcp_tools.seen.big_size = 10_000

    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["big"]})], tool_choice={"type": "any"})

    assert job.status == Status.COMPLETED, job.error
    result = job.result["content"][1]
    assert result["is_error"] is True
    assert result["content"][0]["text"] == "The result of big was larger than 4096 bytes (MESSAGING_MCP_MAX_RESULT_BYTES)."
    assert len(json.dumps(job.result)) < 4096


def test_a_name_that_resolves_to_loopback_is_refused_when_the_policy_is_closed(
    mcp_tools: McpServer, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.MESSAGING_MCP_ALLOW_PRIVATE = False
    port = mcp_tools.url.split(":")[2].split("/")[0]

    async def rebinding_dns(host: str, port: int) -> list[str]:
        # A public name at validation, loopback when connecting: DNS is the edge of the world.
        return ["127.0.0.1"]

    monkeypatch.setattr(outbound, "lookup", rebinding_dns)

    job = run(mcp_servers=[{"type": "url", "url": f"http://tools.example.com:{port}/mcp", "name": "rebound"}])

    assert job.status == Status.FAILED
    assert job.error == {
        "type": "mcp_error",
        "message": 'MCP server "rebound" could not be used: ConnectError: tools.example.com resolves to 127.0.0.1, which the outbound policy refuses',
    }
    assert mcp_tools.seen.calls == {}


# --- the loop through the providers -----------------------------------------------------------------


def test_the_loop_runs_through_the_openai_provider(mcp_tools: McpServer, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream))
    openai_upstream.script(
        streamed(tool_stream(("call_1", "lookup", ['{"key":', ' "door"}']), usage=(20, 9))),
        streamed(text_stream("It is ", "42.", usage=(40, 3))),
    )

    job = run(model="local-model", mcp_servers=[server(mcp_tools)])

    assert job.status == Status.COMPLETED, job.error
    assert job.result["content"] == [
        {"type": "mcp_tool_use", "id": "call_1", "name": "lookup", "server_name": "tools", "input": {"key": "door"}},
        {"type": "mcp_tool_result", "tool_use_id": "call_1", "is_error": False, "content": [{"type": "text", "text": "the value of door is 42"}]},
        {"type": "text", "text": "It is 42."},
    ]
    assert job.result["usage"] == {"input_tokens": 60, "output_tokens": 12}
    first, second = (request.body for request in openai_upstream.requests)
    assert [tool["function"]["name"] for tool in first["tools"]] == ["lookup", "context", "slow", "fail", "big"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["key"]
    assert second["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "door"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "the value of door is 42"},
    ]


def test_the_loop_runs_through_the_anthropic_provider(mcp_tools: McpServer, anthropic_upstream: AnthropicUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalog.models(), "claude-local", anthropic_model(anthropic_upstream))
    anthropic_upstream.script(
        anthropic_streamed(
            [
                anthropic_start(input_tokens=30),
                *anthropic_block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Let me look."}),
                *anthropic_block(1, {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {}}, {"type": "input_json_delta", "partial_json": '{"key": "gate"}'}),
                *anthropic_end("tool_use", output_tokens=15),
            ]
        ),
        anthropic_streamed(anthropic_text_stream("Forty-two.", output_tokens=4)),
    )

    job = run(model="claude-local", mcp_servers=[server(mcp_tools)])

    assert job.status == Status.COMPLETED, job.error
    assert blocks(job) == ["text", "mcp_tool_use", "mcp_tool_result", "text"]
    assert job.result["content"][1]["server_name"] == "tools"
    assert final_text(job) == "Let me look.Forty-two."
    assert job.result["usage"] == {"input_tokens": 40, "output_tokens": 19}
    second = anthropic_upstream.requests[1].body
    assert second["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {"key": "gate"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": [{"type": "text", "text": "the value of gate is 42"}]}]},
    ]


def test_several_calls_in_one_turn_run_at_once(mcp_tools: McpServer, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream))
    openai_upstream.script(streamed(tool_stream(("call_a", "slow", ["{}"]), ("call_b", "slow", ["{}"]))), streamed(text_stream("both done")))

    job = run(model="local-model", mcp_servers=[server(mcp_tools)])

    assert job.status == Status.COMPLETED, job.error
    # Each call waits (up to 30 s) for a second one to be in the tool with it.
    assert mcp_tools.seen.slow_peak == 2
    assert blocks(job) == ["mcp_tool_use", "mcp_tool_use", "mcp_tool_result", "mcp_tool_result", "text"]
    assert [block["is_error"] for block in job.result["content"][2:4]] == [False, False], job.result["content"]


def test_past_the_round_limit_the_message_pauses_and_can_be_continued(
    mcp_tools: McpServer, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.MESSAGING_MAX_TOOL_ROUNDS = 2
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream))
    openai_upstream.script(
        streamed(tool_stream(("call_1", "lookup", ['{"key": "a"}']))),
        streamed(tool_stream(("call_2", "lookup", ['{"key": "b"}']))),
        streamed(text_stream("a and b are 42")),
    )

    job = run(model="local-model", mcp_servers=[server(mcp_tools)])

    assert job.status == Status.COMPLETED, job.error
    assert job.result["stop_reason"] == "pause_turn"
    assert blocks(job) == ["mcp_tool_use", "mcp_tool_result", "mcp_tool_use", "mcp_tool_result"]
    assert len(openai_upstream.requests) == 2 and mcp_tools.seen.calls == {"lookup": 2}

    # The client sends the paused turn back as it is, and the model continues from it.
    continued = run(
        model="local-model",
        mcp_servers=[server(mcp_tools)],
        messages=[{"role": "user", "content": "look it up"}, {"role": "assistant", "content": job.result["content"]}],
    )

    assert continued.status == Status.COMPLETED, continued.error
    assert final_text(continued) == "a and b are 42"
    sent = openai_upstream.requests[2].body["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "tool", "assistant", "tool"]


def test_a_call_to_the_requests_own_tool_still_ends_the_message_for_the_client(
    mcp_tools: McpServer, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream))
    openai_upstream.script(streamed(tool_stream(("call_1", "lookup", ['{"key": "a"}']), ("call_2", "get_weather", ['{"city": "Oslo"}']))))
    own = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]

    job = run(model="local-model", mcp_servers=[server(mcp_tools)], tools=own)

    assert job.status == Status.COMPLETED, job.error
    assert job.result["stop_reason"] == "tool_use"
    assert blocks(job) == ["mcp_tool_use", "tool_use", "mcp_tool_result"]
    assert mcp_tools.seen.calls == {"lookup": 1}
    assert len(openai_upstream.requests) == 1


# --- resuming from what was recorded ------------------------------------------------------------------


def recorded(*content: dict[str, Any]) -> dict[str, Any]:
    return {"id": "m", "type": "message", "role": "assistant", "model": "echo", "content": list(content), "usage": {"input_tokens": 7, "output_tokens": 5}}


def resume(mcp: McpServer, earlier: dict[str, Any]) -> list[dict[str, Any]]:
    request = {
        "model": "echo",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look it up"}]}],
        "mcp_servers": [server(mcp)],
    }
    spec = catalog.get_model("echo")
    assert spec is not None
    return aio.run(aio.collect(toolloop.stream(catalog.provider_for(spec), request, spec, message_id="msg_resumed", recorded=earlier)))


USE = {"type": "mcp_tool_use", "id": "toolu_1", "name": "lookup", "server_name": "tools", "input": {"key": "k"}}
RESULT = {"type": "mcp_tool_result", "tool_use_id": "toolu_1", "is_error": False, "content": [{"type": "text", "text": "recorded answer"}]}


def test_a_resumed_message_replays_a_recorded_result_instead_of_calling_again(mcp_tools: McpServer) -> None:
    stream = resume(mcp_tools, recorded({"type": "text", "text": "Looking."}, USE, RESULT, {"type": "text", "text": "cut sh"}))

    assert mcp_tools.seen.calls == {}
    result = build_result(stream)
    # The recorded blocks up to the result stand; the model's turn after it is made again.
    assert result["content"] == [{"type": "text", "text": "Looking."}, USE, RESULT, {"type": "text", "text": "recorded answer"}]
    assert result["usage"]["input_tokens"] > 7


def test_a_resumed_message_makes_only_the_calls_without_a_recorded_result(mcp_tools: McpServer) -> None:
    second = {**USE, "id": "toolu_2", "input": {"key": "z"}}
    stream = resume(mcp_tools, recorded(USE, second, RESULT))

    assert mcp_tools.seen.calls == {"lookup": 1}
    result = build_result(stream)
    assert [block["type"] for block in result["content"]] == ["mcp_tool_use", "mcp_tool_use", "mcp_tool_result", "mcp_tool_result", "text"]
    assert result["content"][3]["content"] == [{"type": "text", "text": "the value of z is 42"}]


def test_provider_messages_splits_an_assistant_turn_at_its_tool_results() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, USE, RESULT, {"type": "text", "text": "b"}]},
    ]

    assert toolloop.provider_messages(messages) == [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"key": "k"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": RESULT["content"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
    ]


# --- /validate ------------------------------------------------------------------------------------


def test_validate_says_what_the_servers_will_do_without_calling_them(alice: Any, mcp_tools: McpServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "mcp_servers": [
            server(mcp_tools, name="off", tool_configuration={"enabled": False}),
            server(mcp_tools, name="none", tool_configuration={"allowed_tools": []}),
        ],
        "tool_context": TOOL_CONTEXT,
    }

    answer = alice.post("/v1/messages/validate", body, format="json").json()

    assert answer["valid"] is True
    assert answer["request_summary"]["mcp_server_count"] == 2
    assert answer["warnings"] == [
        'mcp_servers[0] ("off") is disabled by tool_configuration.enabled: false; it is not contacted',
        'mcp_servers[1] ("none") has an empty allowed_tools list; it offers no tools',
    ]
    assert mcp_tools.seen.calls == {}

    body["mcp_servers"] = body["mcp_servers"][:1]
    warnings = alice.post("/v1/messages/validate", body, format="json").json()["warnings"]
    assert warnings[-1] == "tool_context is given only to MCP tool calls, and no MCP server is enabled; it is not used"


def test_mcp_blocks_sent_back_are_checked(alice: Any) -> None:
    def errors(*messages: dict[str, Any]) -> list[str]:
        answer = alice.post("/v1/messages/validate", {"messages": list(messages)}, format="json").json()
        assert answer["valid"] is False
        return list(answer["errors"])

    assert errors({"role": "assistant", "content": [{"type": "mcp_tool_use", "id": "x"}]}) == [
        "messages[0].content[0].name: is required",
        "messages[0].content[0].server_name: is required",
        "messages[0].content[0].input: is required",
    ]
    assert errors({"role": "user", "content": [USE]}, {"role": "assistant", "content": [{**RESULT, "tool_use_id": "toolu_other"}]}) == [
        'messages[0].content[0].type: "mcp_tool_use" blocks belong to assistant messages (the service made that call)',
        'messages[1].content[0].tool_use_id: "toolu_other" does not match any earlier mcp_tool_use block',
    ]


def test_the_readmes_example_server_answers_as_the_readme_shows() -> None:
    spec = importlib.util.spec_from_file_location("mcp_example", Path(__file__).resolve().parent.parent / "docs" / "examples" / "mcp_server.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    orders = serve(example.server.streamable_http_app(), "orders", "/mcp", Seen())
    try:
        job = run(
            "Where is order 42?",
            mcp_servers=[{"type": "url", "url": orders.url, "name": "orders"}],
            tool_choice={"type": "any"},
            tool_context=[{"customer": "Ada"}],
        )
    finally:
        orders.stop()

    assert job.status == Status.COMPLETED, job.error
    assert job.result["content"][0]["input"] == {"order": "Where is order 42?"}
    assert final_text(job) == "Dear Ada, order 42 is shipped on 3 March."


def test_at_most_twenty_servers_per_request(alice: Any) -> None:
    servers = [{"type": "url", "url": f"https://tools{n}.example.com/mcp", "name": f"s{n}"} for n in range(21)]

    answer = alice.post("/v1/messages/validate", {"messages": [{"role": "user", "content": "hi"}], "mcp_servers": servers}, format="json").json()

    assert answer["errors"] == ["mcp_servers: must have at most 20 items"]


def test_the_message_timeout_interrupts_a_tool_call_and_closes_it(mcp_tools: McpServer, settings: Any) -> None:
    settings.MESSAGING_JOB_TIMEOUT = 1

    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["slow"]})], tool_choice={"type": "any"})

    assert job.status == Status.FAILED
    assert job.error["type"] == "timeout_error"
    assert blocks(job) == ["mcp_tool_use"]
    # The call was cut (the tool would take 30 s), and the server saw it go.
    wait_until(lambda: mcp_tools.seen.slow_in_flight == 0, what="the tool call to be closed")


def test_tool_results_count_towards_what_a_message_may_store(mcp_tools: McpServer, settings: Any) -> None:
    settings.MESSAGING_MAX_RESULT_CHARS = 5000
    mcp_tools.seen.big_size = 6000

    job = run(mcp_servers=[server(mcp_tools, tool_configuration={"allowed_tools": ["big"]})], tool_choice={"type": "any"})

    assert job.status == Status.FAILED
    assert job.error == {"type": "invalid_output_error", "message": "The answer grew past 5000 characters (MESSAGING_MAX_RESULT_CHARS); it was stopped there."}
    assert blocks(job) == ["mcp_tool_use"]


def test_a_forced_tool_that_no_server_offers_fails_the_message_as_the_clients_mistake(mcp_tools: McpServer) -> None:
    job = run(mcp_servers=[server(mcp_tools)], tool_choice={"type": "tool", "name": "lookup_typo"})

    assert job.status == Status.FAILED
    assert job.error == {"type": "invalid_request_error", "message": 'tool_choice.name "lookup_typo" is none of the tools of the request or its MCP servers.'}
    assert mcp_tools.seen.calls == {}


class _Redirect(BaseHTTPRequestHandler):
    """Answers everything with a redirect to `target` (set per server)."""

    target = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _redirect(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.server.target)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_DELETE = _redirect


def test_a_redirect_to_another_host_is_not_followed(mcp_tools: McpServer) -> None:
    redirector = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    redirector.target = mcp_tools.url  # type: ignore[attr-defined]
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    try:
        job = run(mcp_servers=[{"type": "url", "url": f"http://127.0.0.1:{redirector.server_port}/mcp", "name": "moved"}])
    finally:
        redirector.shutdown()

    assert job.status == Status.FAILED
    assert job.error["type"] == "mcp_error"
    assert job.error["message"] == f'MCP server "moved" could not be used: MCPError: Redirect to {mcp_tools.url} not followed; use that URL as the endpoint if it is the intended server'
    assert mcp_tools.seen.calls == {}


def test_processes_import_the_mcp_sdk_only_when_a_message_needs_it() -> None:
    # 0.35 s and 30 MB per web and worker process otherwise.
    code = (
        "import django, sys; django.setup(); "
        "import messaging.runner, messaging.streaming, messaging.views, project.urls; "
        "print(sorted(name for name in sys.modules if name == 'mcp' or name.startswith(('mcp.', 'mcp_types'))))"
    )
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"})

    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "[]"
