"""Tools on the server through the worker path: a real `qcluster` and web server calling real
MCP servers (tests/mcp_servers.py, threads of this process on loopback) and a real SIGKILL.

tests/test_mcp.py covers the loop's every case in-process; here are the things only processes
show: the worker and the synchronous endpoint run the loop, a worker killed after a tool's
result was recorded leaves a message that completes without calling the tool again, and a
cancel stops a tool call in progress.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from messaging.models import APIKey, MessageEvent
from tests.mcp_servers import McpServer, mcp_tools  # noqa: F401 (a fixture)
from tests.processes import wait_until
from tests.sse import events_only, read_stream
from tests.test_worker import LONG_TEXT, Api

pytestmark = pytest.mark.e2e

OPEN_POLICY = {"MESSAGING_MCP_ALLOW_PRIVATE": "1"}


@pytest.fixture(autouse=True)
def open_policy(settings: Any) -> None:
    # For the live server in this process; the processes get OPEN_POLICY.
    settings.MESSAGING_MCP_ALLOW_PRIVATE = True


@pytest.fixture
def api(live_server: Any, broker: None) -> Api:
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    return Api(live_server.url, key)


def tools(mcp: McpServer, *allowed: str) -> dict[str, Any]:
    return {"mcp_servers": [{"type": "url", "url": mcp.url, "name": "tools", "tool_configuration": {"allowed_tools": list(allowed)}}], "tool_choice": {"type": "any"}}


def recorded(message_id: str) -> list[dict[str, Any]]:
    return list(MessageEvent.objects.filter(job__message_id=message_id).order_by("sequence").values_list("data", flat=True))


def block_types(events: list[dict[str, Any]]) -> list[str]:
    return [event["content_block"]["type"] for event in events if event["type"] == "content_block_start"]


def test_the_worker_runs_the_whole_loop(api: Api, start_cluster: Any, mcp_tools: McpServer) -> None:
    start_cluster(**OPEN_POLICY)
    message_id = api.submit("look it up", stream=True, **tools(mcp_tools, "lookup"))

    state = api.wait_for_status(message_id, "completed", "failed", "error")

    assert state["status"] == "completed", state["error"]
    assert [block["type"] for block in state["result"]["content"]] == ["mcp_tool_use", "mcp_tool_result", "text"]
    assert state["result"]["content"][2]["text"] == "the value of look it up is 42"
    assert block_types(recorded(message_id)) == ["mcp_tool_use", "mcp_tool_result", "text"]
    assert mcp_tools.seen.calls == {"lookup": 1}


def test_the_synchronous_endpoint_streams_the_whole_loop(start_server: Any, transactional_db: None, mcp_tools: McpServer) -> None:
    server = start_server(**OPEN_POLICY)
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    body = {"messages": [{"role": "user", "content": "look it up"}], "stream": True, **tools(mcp_tools, "lookup")}

    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30) as response:
        assert response.status_code == 200
        events = [event.data for event in events_only(read_stream(response))]

    assert [event.get("status") for event in events if event.get("type") == "status"] == ["pending", "processing", "completed"]
    assert block_types(events) == ["mcp_tool_use", "mcp_tool_result", "text"]
    assert mcp_tools.seen.calls == {"lookup": 1}


def test_a_worker_killed_after_a_tool_result_was_recorded_does_not_call_the_tool_again(
    api: Api, start_cluster: Any, mcp_tools: McpServer
) -> None:
    # A long answer keeps echo-slow busy after the tool's result: time to kill its worker.
    mcp_tools.seen.lookup_padding = " " + LONG_TEXT
    cluster = start_cluster(MESSAGING_WORKERS=2, **OPEN_POLICY)
    message_id = api.submit("look it up", model="echo-slow", stream=True, **tools(mcp_tools, "lookup"))
    first = cluster.worker_running(message_id, attempt=1)

    def answering_after_the_result() -> bool:
        events = recorded(message_id)
        kinds = block_types(events)
        return "mcp_tool_result" in kinds and "text" in kinds and events[-1]["type"] == "content_block_delta"

    wait_until(answering_after_the_result, what="the model to answer after the tool's result")
    cluster.kill_worker(first)

    state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
    assert state["status"] == "completed", state["error"]
    assert state["attempts"] == 2
    assert mcp_tools.seen.calls == {"lookup": 1}
    use, result, text = state["result"]["content"]
    assert result["content"][0]["text"] == "the value of look it up is 42 " + LONG_TEXT
    assert text["text"] == result["content"][0]["text"]
    # The second attempt replayed the call and its result, whole, after its own start.
    events = recorded(message_id)
    second_start = max(index for index, event in enumerate(events) if event["type"] == "message_start")
    assert block_types(events[second_start:]) == ["mcp_tool_use", "mcp_tool_result", "text"]


def test_a_cancel_stops_a_tool_call_in_progress(api: Api, start_cluster: Any, mcp_tools: McpServer) -> None:
    start_cluster(**OPEN_POLICY)
    message_id = api.submit("take your time", **tools(mcp_tools, "slow"))
    wait_until(lambda: mcp_tools.seen.slow_in_flight == 1, what="the slow tool to be called")

    status, body = api.call("POST", f"/v1/messages/{message_id}/cancel")

    assert status == 200 and body["status"] == "cancelled"
    # The tool would take 30 s: its call ends long before, closed by the worker.
    wait_until(lambda: mcp_tools.seen.slow_in_flight == 0, timeout=20, what="the tool call to be closed")
    assert mcp_tools.seen.slow_cancelled == 1
    assert json.dumps(api.message(message_id)["result"]).count("mcp_tool_result") == 0
