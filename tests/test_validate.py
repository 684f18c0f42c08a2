"""POST /v1/messages/validate: the request contract of API.md section 2, rule by rule.

Every case goes through HTTP, so the parser, the field rules, the cross-field rules, the error
paths and the summary are proven together. /async validates the same way (checked at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from messaging.models import MessageEvent, MessageJob
from tests.conftest import VALID_REQUEST

VALIDATE = "/v1/messages/validate"
ASYNC = "/v1/messages/async"

USER = {"role": "user", "content": "What is the weather in Paris?"}
ASSISTANT = {"role": "assistant", "content": "Let me look."}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"name": "get_weather", "description": "Current weather for a city", "input_schema": SCHEMA}
MCP = {"type": "url", "url": "https://mcp.example.com/sse", "name": "weather"}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def validate(client: APIClient, body: Any) -> dict[str, Any]:
    # Encoded here: the test client sends an empty body for a None.
    response = client.post(VALIDATE, json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    result = response.json()
    assert set(result) == {"valid", "errors", "warnings", "request_summary"}
    assert result["valid"] is (result["errors"] == [])
    return result


def blocks(*content: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(content)}]}


def tool_use(id: str = "toolu_1", **fields: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": id, "name": "get_weather", "input": {"city": "Paris"}, **fields}


def tool_result(tool_use_id: str = "toolu_1", **fields: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": "18°C, sunny", **fields}


def tool_turns(result: dict[str, Any]) -> dict[str, Any]:
    """A tool call by the assistant, then the user's tool_result."""
    return {
        "messages": [
            USER,
            {"role": "assistant", "content": [tool_use()]},
            {"role": "user", "content": [result]},
        ],
        "tools": [TOOL],
    }


# --- Valid requests ---------------------------------------------------------------------------

VALID_BODIES: dict[str, dict[str, Any]] = {
    "content as a string": {"messages": [USER]},
    "content as a text block": blocks({"type": "text", "text": "Hi"}),
    "a base64 image": blocks({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}),
    "a url image": blocks({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}),
    "a tool_result answering an earlier tool_use": tool_turns(tool_result()),
    "a tool_result with block content and is_error": tool_turns(
        tool_result(content=[{"type": "text", "text": "no such city"}], is_error=True)
    ),
    "a tool_result without content": tool_turns({"type": "tool_result", "tool_use_id": "toolu_1"}),
    "a thinking block with a signature": {
        "messages": [USER, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Sunny."}]}, USER]
    },
    "a tool name of 64 characters": {"messages": [USER], "tools": [{**TOOL, "name": "a" * 64}]},
    "tools without description": {"messages": [USER], "tools": [{"name": "t-1_X", "input_schema": {"type": "object"}}]},
    "tool_choice naming a tool": {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_weather"}},
    "tool_choice any with tools": {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
    "tool_choice any with only an MCP server": {"messages": [USER], "mcp_servers": [MCP], "tool_choice": {"type": "any"}},
    "tool_choice naming a tool an MCP server may offer": {"messages": [USER], "mcp_servers": [MCP], "tool_choice": {"type": "tool", "name": "forecast"}},
    "tool_context of any items": {"messages": [USER], "tool_context": [{"dsn": "postgres://x"}, "a document", 42, [1, 2], None]},
    "a full MCP server": {
        "messages": [USER],
        "mcp_servers": [{**MCP, "authorization_token": "secret", "tool_configuration": {"enabled": True, "allowed_tools": ["forecast"]}}],
    },
    "two MCP servers with distinct names": {"messages": [USER], "mcp_servers": [MCP, {**MCP, "name": "other", "url": "http://93.184.216.34/mcp"}]},
    "response_format text": {"messages": [USER], "response_format": {"type": "text"}},
    "response_format json_schema": {
        "messages": [USER],
        "response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}},
    },
    "response_format tool_call": {"messages": [USER], "tools": [TOOL], "response_format": {"type": "tool_call", "name": "get_weather"}},
    "system as a string": {"messages": [USER], "system": "You are terse."},
    "system as an object": {"messages": [USER], "system": {"prompt": "You are terse.", "citations": {"enabled": True}}},
    "thinking enabled below max_tokens": {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1025},
    "thinking disabled": {"messages": [USER], "thinking": {"type": "disabled"}},
    "every nullable field null": {
        "messages": [USER],
        **dict.fromkeys(
            ["model", "tools", "tool_choice", "tool_context", "mcp_servers", "response_format", "system", "thinking",
             "priority", "seed", "temperature", "top_p", "min_p", "top_k", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "max_tokens", "correlation_id"]
        ),
    },
    "the lowest bounds": {
        "messages": [USER], "priority": 0, "seed": INT64_MIN, "temperature": 0, "top_p": 0.001, "min_p": 0,
        "top_k": 0, "repetition_penalty": 0.01, "presence_penalty": -2, "frequency_penalty": -2, "max_tokens": 1,
        "correlation_id": "x",
    },
    "the highest bounds": {
        "messages": [USER], "priority": 10, "seed": INT64_MAX, "temperature": 2, "top_p": 1, "min_p": 1,
        "top_k": 1000, "repetition_penalty": 2, "presence_penalty": 2, "frequency_penalty": 2, "max_tokens": 8192,
        "correlation_id": "x" * 255,
    },
    "an integral float where an integer is expected": {"messages": [USER], "max_tokens": 100.0},
    "a configured model": {"messages": [USER], "model": "echo-slow"},
    "stream true": {"messages": [USER], "stream": True},
}


@pytest.mark.parametrize("body", VALID_BODIES.values(), ids=VALID_BODIES.keys())
def test_it_accepts_a_valid_request(alice: APIClient, body: dict[str, Any]) -> None:
    result = validate(alice, body)

    assert result["errors"] == []
    assert result["valid"] is True


# --- Field errors, each with its JSON path ------------------------------------------------------

NOT_BASE64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}
ERRORS: dict[str, tuple[dict[str, Any], list[str]]] = {
    # messages and roles
    "messages missing": ({}, ["messages: is required"]),
    "messages empty": ({"messages": []}, ["messages: must not be empty"]),
    "messages not an array": ({"messages": "Hi"}, ["messages: must be an array, not string"]),
    "a message not an object": ({"messages": ["Hi"]}, ["messages[0]: must be an object, not string"]),
    "a system role": (
        {"messages": [USER, {"role": "system", "content": "x"}]},
        ['messages[1].role: "system" is not one of user, assistant'],
    ),
    "role missing": ({"messages": [{"content": "Hi"}]}, ["messages[0].role: is required"]),
    "role not a string": ({"messages": [{"role": 1, "content": "Hi"}]}, ['messages[0].role: "1" is not one of user, assistant']),
    "content missing": ({"messages": [{"role": "user"}]}, ["messages[0].content: is required"]),
    "content empty string": ({"messages": [{"role": "user", "content": ""}]}, ["messages[0].content: must not be empty"]),
    "content blank string": ({"messages": [{"role": "user", "content": " \n "}]}, ["messages[0].content: must not be empty"]),
    "content empty array": ({"messages": [{"role": "user", "content": []}]}, ["messages[0].content: must not be empty"]),
    "content a number": (
        {"messages": [{"role": "user", "content": 5}]},
        ["messages[0].content: must be a string or an array of content blocks, not number"],
    ),
    "content null": ({"messages": [{"role": "user", "content": None}]}, ["messages[0].content: must not be null"]),
    # content blocks
    "a block not an object": (blocks("Hi"), ["messages[0].content[0]: must be an object, not string"]),  # type: ignore[arg-type]
    "an unknown block type": (
        blocks({"type": "video", "url": "x"}),
        ['messages[0].content[0].type: "video" is not one of text, image, tool_use, tool_result, thinking, mcp_tool_use, mcp_tool_result'],
    ),
    "a block without type": (
        blocks({"text": "Hi"}),
        ["messages[0].content[0].type: is required"],
    ),
    "text not a string": (blocks({"type": "text", "text": 5}), ["messages[0].content[0].text: must be a string, not number"]),
    "text empty": (blocks({"type": "text", "text": ""}), ["messages[0].content[0].text: must not be empty"]),
    "text missing": (blocks({"type": "text"}), ["messages[0].content[0].text: is required"]),
    "an image source type": (
        blocks({"type": "image", "source": {"type": "file", "path": "/etc/passwd"}}),
        ['messages[0].content[0].source.type: "file" is not one of base64, url'],
    ),
    "an image without source": (blocks({"type": "image"}), ["messages[0].content[0].source: is required"]),
    "a base64 image without media_type and data": (
        blocks({"type": "image", "source": {"type": "base64"}}),
        [
            "messages[0].content[0].source.media_type: is required for a base64 image",
            "messages[0].content[0].source.data: is required for a base64 image",
        ],
    ),
    "a base64 image of another media_type": (
        blocks({"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}}),
        ['messages[0].content[0].source.media_type: "image/bmp" is not one of image/jpeg, image/png, image/gif, image/webp'],
    ),
    "a base64 image that is not base64": (blocks(NOT_BASE64), ["messages[0].content[0].source.data: is not base64"]),
    "a url image without url": (
        blocks({"type": "image", "source": {"type": "url"}}),
        ["messages[0].content[0].source.url: is required for a url image"],
    ),
    "a url image that is not http(s)": (
        blocks({"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}),
        ["messages[0].content[0].source.url: must be an http(s) URL"],
    ),
    "a tool_use without id and name": (
        blocks({"type": "tool_use", "input": {}}),
        ["messages[0].content[0].id: is required", "messages[0].content[0].name: is required"],
    ),
    "a tool_use whose input is not an object": (
        blocks(tool_use(input=["Paris"])),
        ["messages[0].content[0].input: must be an object, not array"],
    ),
    "a tool_result answering no tool_use": (
        {"messages": [{"role": "user", "content": [tool_result("toolu_missing")]}]},
        ['messages[0].content[0].tool_use_id: "toolu_missing" does not match any earlier tool_use block'],
    ),
    "a tool_result before its tool_use": (
        {"messages": [{"role": "user", "content": [tool_result()]}, {"role": "assistant", "content": [tool_use()]}]},
        ['messages[0].content[0].tool_use_id: "toolu_1" does not match any earlier tool_use block'],
    ),
    "a tool_result answering another id": (
        tool_turns(tool_result("toolu_2")),
        ['messages[2].content[0].tool_use_id: "toolu_2" does not match any earlier tool_use block'],
    ),
    "a tool_result with a tool_use inside": (
        tool_turns(tool_result(content=[tool_use("toolu_9")])),
        ['messages[2].content[0].content[0].type: "tool_use" is not one of text, image'],
    ),
    "a tool_result whose content is a number": (
        tool_turns(tool_result(content=5)),
        ["messages[2].content[0].content: must be a string or an array of text and image blocks"],
    ),
    "a tool_result whose is_error is a string": (
        tool_turns(tool_result(is_error="yes")),
        ["messages[2].content[0].is_error: must be true or false"],
    ),
    "a thinking block without thinking": (blocks({"type": "thinking"}), ["messages[0].content[0].thinking: is required"]),
    "a thinking signature that is not a string": (
        blocks({"type": "thinking", "thinking": "hmm", "signature": 1}),
        ["messages[0].content[0].signature: must be a string, not number"],
    ),
    # tools
    "tools not an array": ({"messages": [USER], "tools": TOOL}, ["tools: must be an array, not object"]),
    "a tool name with a space": (
        {"messages": [USER], "tools": [{**TOOL, "name": "get weather"}]},
        ["tools[0].name: must match ^[a-zA-Z0-9_-]{1,64}$"],
    ),
    "a tool name of 65 characters": (
        {"messages": [USER], "tools": [{**TOOL, "name": "a" * 65}]},
        ["tools[0].name: must match ^[a-zA-Z0-9_-]{1,64}$"],
    ),
    "an empty tool name": ({"messages": [USER], "tools": [{**TOOL, "name": ""}]}, ["tools[0].name: must not be empty"]),
    "a tool without input_schema": (
        {"messages": [USER], "tools": [{"name": "t"}]},
        ["tools[0].input_schema: is required"],
    ),
    "an input_schema not an object": (
        {"messages": [USER], "tools": [{"name": "t", "input_schema": "object"}]},
        ["tools[0].input_schema: must be an object, not string"],
    ),
    "an input_schema of type string": (
        {"messages": [USER], "tools": [{"name": "t", "input_schema": {"type": "string"}}]},
        ['tools[0].input_schema: must be a JSON Schema with "type": "object"'],
    ),
    "an input_schema without type": (
        {"messages": [USER], "tools": [{"name": "t", "input_schema": {"properties": {}}}]},
        ['tools[0].input_schema: must be a JSON Schema with "type": "object"'],
    ),
    "an input_schema that is not a JSON Schema": (
        {"messages": [USER], "tools": [{"name": "t", "input_schema": {"type": "object", "properties": 5}}]},
        ["tools[0].input_schema: is not a valid JSON Schema: 5 is not of type 'object' (at .properties)"],
    ),
    "two tools with one name": (
        {"messages": [USER], "tools": [TOOL, {**TOOL, "description": "again"}]},
        ['tools[1].name: "get_weather" is used by an earlier tool; names must be unique'],
    ),
    # tool_choice
    "tool_choice not an object": ({"messages": [USER], "tools": [TOOL], "tool_choice": "auto"}, ["tool_choice: must be an object, not string"]),
    "a tool_choice type": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "required"}},
        ['tool_choice.type: "required" is not one of auto, any, tool, none'],
    ),
    "tool_choice tool without name": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "tool"}},
        ['tool_choice.name: is required when type is "tool"'],
    ),
    "tool_choice auto with a name": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "auto", "name": "get_weather"}},
        ['tool_choice.name: is allowed only when type is "tool"'],
    ),
    "tool_choice any with a name": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "any", "name": "get_weather"}},
        ['tool_choice.name: is allowed only when type is "tool"'],
    ),
    "tool_choice naming no tool": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_time"}},
        ['tool_choice.name: "get_time" is not one of the tools'],
    ),
    "tool_choice any without tools": (
        {"messages": [USER], "tool_choice": {"type": "any"}},
        ['tool_choice.type: "any" needs tools or mcp_servers'],
    ),
    "tool_choice tool without tools": (
        {"messages": [USER], "tools": [], "tool_choice": {"type": "tool", "name": "get_weather"}},
        ['tool_choice.type: "tool" needs tools or mcp_servers'],
    ),
    "disable_parallel_tool_use not a boolean": (
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}},
        ["tool_choice.disable_parallel_tool_use: must be true or false"],
    ),
    # tool_context
    "tool_context not an array": ({"messages": [USER], "tool_context": {"doc": "x"}}, ["tool_context: must be an array, not object"]),
    # mcp_servers
    "an MCP server type": (
        {"messages": [USER], "mcp_servers": [{**MCP, "type": "sse"}]},
        ['mcp_servers[0].type: "sse" is not one of url'],
    ),
    "an MCP server without url and name": (
        {"messages": [USER], "mcp_servers": [{"type": "url"}]},
        ["mcp_servers[0].url: is required", "mcp_servers[0].name: is required"],
    ),
    "an MCP url that is not http(s)": (
        {"messages": [USER], "mcp_servers": [{**MCP, "url": "ws://mcp.example.com"}]},
        ["mcp_servers[0].url: must be an http(s) URL"],
    ),
    "two MCP servers with one name": (
        {"messages": [USER], "mcp_servers": [MCP, {**MCP, "url": "https://other.example.com/sse"}]},
        ['mcp_servers[1].name: "weather" is used by an earlier server; names must be unique'],
    ),
    "an MCP allowed_tools that is not an array": (
        {"messages": [USER], "mcp_servers": [{**MCP, "tool_configuration": {"allowed_tools": "forecast"}}]},
        ["mcp_servers[0].tool_configuration.allowed_tools: must be an array, not string"],
    ),
    "an MCP authorization_token that is not a string": (
        {"messages": [USER], "mcp_servers": [{**MCP, "authorization_token": 123}]},
        ["mcp_servers[0].authorization_token: must be a string, not number"],
    ),
    # response_format
    "a response_format type": (
        {"messages": [USER], "response_format": {"type": "xml"}},
        ['response_format.type: "xml" is not one of text, json_schema, tool_call'],
    ),
    "json_schema without its schema": (
        {"messages": [USER], "response_format": {"type": "json_schema"}},
        ['response_format.json_schema: is required when type is "json_schema"'],
    ),
    "json_schema whose schema is not a JSON Schema": (
        {"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}}},
        ["response_format.json_schema.schema: is not a valid JSON Schema: 'nonsense' is not valid under any of the given schemas (at .type)"],
    ),
    "json_schema without name": (
        {"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
        ["response_format.json_schema.name: is required"],
    ),
    "tool_call without tools": (
        {"messages": [USER], "response_format": {"type": "tool_call"}},
        ['response_format.type: "tool_call" needs tools or mcp_servers'],
    ),
    "tool_call naming no tool": (
        {"messages": [USER], "tools": [TOOL], "response_format": {"type": "tool_call", "name": "get_time"}},
        ['response_format.name: "get_time" is not one of the tools'],
    ),
    # system
    "system a number": (
        {"messages": [USER], "system": 5},
        ["system: must be a string, an object {prompt, citations?} or an array of text blocks"],
    ),
    "system blocks that are not text": (
        {"messages": [USER], "system": [{"type": "image", "source": {"type": "url", "url": "https://x.example/a.png"}}]},
        ['system[0].type: "image" is not one of text'],
    ),
    "system without prompt": ({"messages": [USER], "system": {}}, ["system.prompt: is required"]),
    "citations.enabled not a boolean": (
        {"messages": [USER], "system": {"prompt": "x", "citations": {"enabled": "yes"}}},
        ["system.citations.enabled: must be true or false"],
    ),
    # thinking
    "a thinking type": ({"messages": [USER], "thinking": {"type": "on"}}, ['thinking.type: "on" is not one of enabled, disabled']),
    "thinking enabled without budget": (
        {"messages": [USER], "thinking": {"type": "enabled"}, "max_tokens": 4096},
        ['thinking.budget_tokens: is required when type is "enabled"'],
    ),
    "a thinking budget below 1024": (
        {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 1023}, "max_tokens": 4096},
        ["thinking.budget_tokens: must be at least 1024"],
    ),
    "a thinking budget equal to max_tokens": (
        {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048},
        ["thinking.budget_tokens: must be less than max_tokens (2048)"],
    ),
    "a thinking budget above max_tokens": (
        {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 4096}, "max_tokens": 2048},
        ["thinking.budget_tokens: must be less than max_tokens (2048)"],
    ),
    "a thinking budget against a null max_tokens": (
        {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": None},
        ["thinking.budget_tokens: must be less than max_tokens, which is null: echo's default of 1024"],
    ),
    "a thinking budget against an absent max_tokens and model": (
        {"messages": [USER], "thinking": {"type": "enabled", "budget_tokens": 2000}},
        ["thinking.budget_tokens: must be less than max_tokens, which is null: echo's default of 1024"],
    ),
    # numbers and their bounds
    "priority below 0": ({"messages": [USER], "priority": -1}, ["priority: must be at least 0"]),
    "priority above 10": ({"messages": [USER], "priority": 11}, ["priority: must be at most 10"]),
    "priority with a fraction": ({"messages": [USER], "priority": 5.5}, ["priority: must be an integer"]),
    "seed above int64": ({"messages": [USER], "seed": INT64_MAX + 1}, [f"seed: must be at most {INT64_MAX}"]),
    "seed below int64": ({"messages": [USER], "seed": INT64_MIN - 1}, ["seed: must be a 64-bit integer"]),
    "seed far above int64": ({"messages": [USER], "seed": 2**64}, ["seed: must be a 64-bit integer"]),
    "temperature below 0": ({"messages": [USER], "temperature": -0.1}, ["temperature: must be at least 0"]),
    "temperature above 2": ({"messages": [USER], "temperature": 2.01}, ["temperature: must be at most 2"]),
    "top_p of 0": ({"messages": [USER], "top_p": 0}, ["top_p: must be above 0"]),
    "top_p above 1": ({"messages": [USER], "top_p": 1.01}, ["top_p: must be at most 1"]),
    "min_p below 0": ({"messages": [USER], "min_p": -0.01}, ["min_p: must be at least 0"]),
    "min_p above 1": ({"messages": [USER], "min_p": 1.01}, ["min_p: must be at most 1"]),
    "top_k below 0": ({"messages": [USER], "top_k": -1}, ["top_k: must be at least 0"]),
    "top_k with a fraction": ({"messages": [USER], "top_k": 1.5}, ["top_k: must be an integer"]),
    "repetition_penalty of 0": ({"messages": [USER], "repetition_penalty": 0}, ["repetition_penalty: must be above 0"]),
    "repetition_penalty below 0": ({"messages": [USER], "repetition_penalty": -1}, ["repetition_penalty: must be above 0"]),
    "presence_penalty below -2": ({"messages": [USER], "presence_penalty": -2.5}, ["presence_penalty: must be at least -2"]),
    "presence_penalty above 2": ({"messages": [USER], "presence_penalty": 2.5}, ["presence_penalty: must be at most 2"]),
    "frequency_penalty below -2": ({"messages": [USER], "frequency_penalty": -3}, ["frequency_penalty: must be at least -2"]),
    "frequency_penalty above 2": ({"messages": [USER], "frequency_penalty": 3}, ["frequency_penalty: must be at most 2"]),
    "max_tokens of 0": ({"messages": [USER], "max_tokens": 0}, ["max_tokens: must be at least 1"]),
    "max_tokens above the model's limit": (
        {"messages": [USER], "model": "echo", "max_tokens": 8193},
        ["max_tokens: must be at most 8192, the limit of echo"],
    ),
    "max_tokens above the default model's limit": (
        {"messages": [USER], "max_tokens": 100_000},
        ["max_tokens: must be at most 8192, the limit of echo"],
    ),
    "a correlation_id of 256 characters": (
        {"messages": [USER], "correlation_id": "x" * 256},
        ["correlation_id: must be at most 255 characters"],
    ),
    "an unknown model": ({"messages": [USER], "model": "gpt-5"}, ['model: "gpt-5" is not a configured model; see GET /v1/models']),
    # strict types: no coercion
    "a string for an integer": ({"messages": [USER], "max_tokens": "100"}, ["max_tokens: must be an integer"]),
    "a boolean for an integer": ({"messages": [USER], "priority": True}, ["priority: must be an integer"]),
    "a boolean for a seed": ({"messages": [USER], "seed": False}, ["seed: must be an integer"]),
    "a string for a number": ({"messages": [USER], "temperature": "0.5"}, ["temperature: must be a number"]),
    "a boolean for a number": ({"messages": [USER], "top_p": True}, ["top_p: must be a number"]),
    "a string for a boolean": ({"messages": [USER], "stream": "true"}, ["stream: must be true or false"]),
    "a number for a boolean": ({"messages": [USER], "stream": 1}, ["stream: must be true or false"]),
    "a number for a string": ({"messages": [USER], "correlation_id": 42}, ["correlation_id: must be a string, not number"]),
    "a number for the model": ({"messages": [USER], "model": 1}, ["model: must be a string, not number"]),
    "null for stream": ({"messages": [USER], "stream": None}, ["stream: must not be null"]),
}


@pytest.mark.parametrize(("body", "errors"), ERRORS.values(), ids=ERRORS.keys())
def test_it_reports_each_rule_with_its_json_path(alice: APIClient, body: dict[str, Any], errors: list[str]) -> None:
    result = validate(alice, body)

    assert result["valid"] is False
    assert result["errors"] == errors


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "localhost", "[::1]", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "metadata.internal"],
)
def test_it_refuses_an_mcp_server_the_outbound_policy_forbids(alice: APIClient, address: str) -> None:
    result = validate(alice, {"messages": [USER], "mcp_servers": [{**MCP, "url": f"http://{address}:8080/mcp"}]})

    host = address.strip("[]")
    assert result["errors"] == [f"mcp_servers[0].url: {host} is not allowed by this server's outbound policy"]


@pytest.mark.parametrize(
    ("policy", "url", "allowed"),
    [
        ({"MESSAGING_MCP_ALLOW_PRIVATE": True}, "http://127.0.0.1:8080/mcp", True),
        ({"MESSAGING_MCP_ALLOWED_HOSTS": [".example.com"]}, "https://tools.example.com/mcp", True),
        ({"MESSAGING_MCP_ALLOWED_HOSTS": [".example.com"]}, "https://tools.example.org/mcp", False),
    ],
)
def test_the_outbound_policy_follows_its_settings(alice: APIClient, settings: Any, policy: dict[str, Any], url: str, allowed: bool) -> None:
    for name, value in policy.items():
        setattr(settings, name, value)

    result = validate(alice, {"messages": [USER], "mcp_servers": [{**MCP, "url": url}]})

    assert result["valid"] is allowed, result["errors"]


def test_the_outbound_policy_is_read_from_the_environment() -> None:
    environment = {**os.environ, "MESSAGING_MCP_ALLOWED_HOSTS": "mcp.example.com, .tools.example.org", "MESSAGING_MCP_ALLOW_PRIVATE": "true"}
    printed = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; "
         "print(settings.MESSAGING_MCP_ALLOWED_HOSTS, settings.MESSAGING_MCP_ALLOW_PRIVATE)"],
        env={**environment, "DJANGO_SETTINGS_MODULE": "project.settings"},
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    ).stdout

    assert printed.strip() == "['mcp.example.com', '.tools.example.org'] True"


def test_it_reports_every_error_at_once_field_and_cross_field_alike(alice: APIClient) -> None:
    body = {
        "messages": [
            USER,
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": 42}]},
            {"role": "user", "content": [tool_result("toolu_nowhere")]},
        ],
        "tools": [{"name": "lookup", "input_schema": {"type": "array"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "max_tokens": 1500,
        "temperature": "hot",
        "model": "gpt-5",
    }

    result = validate(alice, body)

    assert result["valid"] is False
    assert result["errors"] == [
        'messages[1].role: "system" is not one of user, assistant',
        "messages[2].content[0].text: must be a string, not number",
        'tools[0].input_schema: must be a JSON Schema with "type": "object"',
        "temperature: must be a number",
        'model: "gpt-5" is not a configured model; see GET /v1/models',
        "thinking.budget_tokens: must be less than max_tokens (1500)",
    ]


def test_it_reports_a_cross_field_error_beside_a_field_error(alice: APIClient) -> None:
    body = {
        "messages": [
            {"role": "user", "content": [tool_result("toolu_nowhere")]},
            {"role": "robot", "content": "beep"},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 4096},
        "max_tokens": 2048,
    }

    result = validate(alice, body)

    # One message failed, so the tool_result rule (which needs the whole conversation) waits; the
    # thinking rule, whose fields parsed, is reported beside the field error.
    assert result["errors"] == [
        'messages[1].role: "robot" is not one of user, assistant',
        "thinking.budget_tokens: must be less than max_tokens (2048)",
    ]


def test_it_does_not_blame_tool_choice_for_a_tool_that_failed_validation(alice: APIClient) -> None:
    body = {"messages": [USER], "tools": [{"name": "get weather", "input_schema": SCHEMA}], "tool_choice": {"type": "tool", "name": "get weather"}}

    result = validate(alice, body)

    assert result["errors"] == ["tools[0].name: must match ^[a-zA-Z0-9_-]{1,64}$"]


def test_it_does_not_blame_tool_choice_when_the_mcp_servers_failed_validation(alice: APIClient) -> None:
    body = {"messages": [USER], "mcp_servers": [{**MCP, "url": "http://127.0.0.1/"}], "tool_choice": {"type": "tool", "name": "forecast"}}

    result = validate(alice, body)

    assert result["errors"] == ["mcp_servers[0].url: 127.0.0.1 is not allowed by this server's outbound policy"]


@pytest.mark.parametrize("body", [[VALID_REQUEST], "Hello", 42, None], ids=["array", "string", "number", "null"])
def test_it_explains_a_body_that_is_not_an_object(alice: APIClient, body: Any) -> None:
    result = validate(alice, body)

    kind = {list: "array", str: "string", int: "number", type(None): "null"}[type(body)]
    assert result["errors"] == [f"The request body must be a JSON object, not {kind}."]


# --- Warnings -----------------------------------------------------------------------------------

STREAM_ON_ASYNC = (
    "stream: true on /v1/messages/async records every token delta, so GET /v1/messages/{message_id}/stream "
    "shows the answer as it is written; the response itself is still the 202 acknowledgement"
)
THINKING = {"type": "enabled", "budget_tokens": 1024}
WARNINGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown top-level fields": (
        {"messages": [USER], "temprature": 0.5, "user_id": "u1"},
        ["unknown fields are ignored: temprature, user_id"],
    ),
    "both temperature and top_p": (
        {"messages": [USER], "temperature": 0.5, "top_p": 0.9},
        ["temperature and top_p are both set; set one of them", "echo ignores temperature, top_p"],
    ),
    "sampling fields the model ignores": (
        {"messages": [USER], "model": "echo-slow", "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.1,
         "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 7},
        ["echo-slow ignores min_p, top_k, repetition_penalty, presence_penalty, frequency_penalty"],
    ),
    "a repetition_penalty above 2": (
        {"messages": [USER], "repetition_penalty": 2.5},
        ["echo ignores repetition_penalty", "repetition_penalty above 2 usually degrades output badly"],
    ),
    "consecutive messages of one role": (
        {"messages": [USER, USER, ASSISTANT, ASSISTANT, USER]},
        [
            "messages[0] and messages[1] are both from user; consecutive messages of one role are merged by most providers",
            "messages[2] and messages[3] are both from assistant; consecutive messages of one role are merged by most providers",
        ],
    ),
    "a first message from assistant": (
        {"messages": [ASSISTANT, USER]},
        ["messages[0] is from assistant; most providers expect the conversation to start with user"],
    ),
    "a prefill with thinking": (
        {"messages": [USER, ASSISTANT], "thinking": THINKING, "max_tokens": 2048},
        ["a final assistant message (prefill) is not supported together with thinking"],
    ),
    "temperature other than 1 with thinking": (
        {"messages": [USER], "thinking": THINKING, "max_tokens": 2048, "temperature": 0.7},
        ["echo ignores temperature", "thinking is enabled; temperature other than 1 is ignored or refused by providers"],
    ),
    "tool_choice auto without tools": (
        {"messages": [USER], "tool_choice": {"type": "auto"}},
        ["tool_choice is given without tools; it has no effect"],
    ),
    "tool_choice none without tools": (
        {"messages": [USER], "tool_choice": {"type": "none"}},
        ["tool_choice is given without tools; it has no effect"],
    ),
}


@pytest.mark.parametrize(("body", "warnings"), WARNINGS.values(), ids=WARNINGS.keys())
def test_it_warns_but_still_accepts(alice: APIClient, body: dict[str, Any], warnings: list[str]) -> None:
    result = validate(alice, body)

    assert result["valid"] is True
    assert result["warnings"] == warnings


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [USER], "seed": 7},
        {"messages": [USER], "thinking": THINKING, "max_tokens": 2048},
        {"messages": [USER, ASSISTANT]},
        {"messages": [USER], "tools": [TOOL], "tool_choice": {"type": "auto"}},
        {"messages": [USER], "stream": True},
    ],
    ids=["seed, which echo honours", "thinking without a prefill", "a prefill without thinking", "tool_choice with tools", "stream on validate"],
)
def test_it_does_not_warn_about_what_is_fine(alice: APIClient, body: dict[str, Any]) -> None:
    assert validate(alice, body)["warnings"] == []


def test_it_accepts_a_temperature_of_1_with_thinking(alice: APIClient) -> None:
    body = {"messages": [USER], "thinking": THINKING, "max_tokens": 2048, "temperature": 1}

    assert validate(alice, body)["warnings"] == ["echo ignores temperature"]


def test_it_reports_warnings_beside_errors(alice: APIClient) -> None:
    result = validate(alice, {"messages": [ASSISTANT, {"role": "user", "content": ""}], "colour": "blue"})

    assert result["errors"] == ["messages[1].content: must not be empty"]
    assert result["warnings"] == ["unknown fields are ignored: colour"]


def test_async_carries_the_stream_warning_in_its_202(alice: APIClient) -> None:
    response = alice.post(ASYNC, {**VALID_REQUEST, "stream": True}, format="json")

    assert response.status_code == 202
    assert response.json()["warnings"] == [STREAM_ON_ASYNC]


def test_async_leaves_warnings_out_when_there_are_none(alice: APIClient) -> None:
    response = alice.post(ASYNC, VALID_REQUEST, format="json")

    assert response.status_code == 202
    assert "warnings" not in response.json()


# --- The request summary ------------------------------------------------------------------------


def test_it_summarizes_a_request_as_the_contract_shows(alice: APIClient) -> None:
    body = {"messages": [USER, ASSISTANT, USER], "tools": [TOOL], "temperature": 0.5, "top_p": 0.9}

    result = validate(alice, body)

    summary = result["request_summary"]
    estimated = summary.pop("estimated_input_tokens")
    assert summary == {
        "message_count": 3,
        "has_tools": True,
        "stream_enabled": False,
        "tool_choice": "auto",
        "model": "echo",
        "tool_count": 1,
        "mcp_server_count": 0,
        "max_tokens": 1024,
    }
    assert isinstance(estimated, int) and estimated > 0
    assert result["warnings"][0] == "temperature and top_p are both set; set one of them"


@pytest.mark.parametrize(
    ("fields", "tool_choice"),
    [
        ({}, None),
        ({"tool_choice": {"type": "none"}}, "none"),
        ({"tools": [TOOL]}, "auto"),
        ({"mcp_servers": [MCP]}, "auto"),
        ({"tools": [TOOL], "tool_choice": {"type": "any"}}, "any"),
        ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_weather"}}, "tool"),
        ({"tools": [TOOL], "tool_choice": {"type": "none"}}, "none"),
    ],
)
def test_its_summary_names_the_tool_choice(alice: APIClient, fields: dict[str, Any], tool_choice: str | None) -> None:
    summary = validate(alice, {"messages": [USER], **fields})["request_summary"]

    assert summary["tool_choice"] == tool_choice


@pytest.mark.parametrize(
    ("fields", "model", "max_tokens"),
    [
        ({}, "echo", 1024),
        ({"model": None, "max_tokens": None}, "echo", 1024),
        ({"model": "echo-slow"}, "echo-slow", 1024),
        ({"max_tokens": 77}, "echo", 77),
    ],
)
def test_its_summary_resolves_the_model_and_max_tokens(
    alice: APIClient, fields: dict[str, Any], model: str, max_tokens: int
) -> None:
    summary = validate(alice, {"messages": [USER], **fields})["request_summary"]

    assert (summary["model"], summary["max_tokens"]) == (model, max_tokens)


def test_its_summary_counts_tools_servers_and_stream(alice: APIClient) -> None:
    body = {
        "messages": [USER],
        "tools": [TOOL, {**TOOL, "name": "get_time"}],
        "mcp_servers": [MCP],
        "stream": True,
    }

    summary = validate(alice, body)["request_summary"]

    assert (summary["tool_count"], summary["mcp_server_count"], summary["has_tools"], summary["stream_enabled"]) == (2, 1, True, True)


def test_its_summary_counts_what_was_sent_even_when_it_failed(alice: APIClient) -> None:
    body = {
        "messages": [USER, {"role": "system", "content": "x"}, USER],
        "tools": [TOOL, {"name": "bad name", "input_schema": SCHEMA}],
    }

    result = validate(alice, body)

    assert result["valid"] is False
    summary = result["request_summary"]
    assert (summary["message_count"], summary["tool_count"], summary["has_tools"]) == (3, 2, True)


def test_its_estimate_grows_with_the_input(alice: APIClient) -> None:
    short = validate(alice, {"messages": [{"role": "user", "content": "Hi"}]})["request_summary"]
    long = validate(alice, {"messages": [{"role": "user", "content": "Hi " * 400}]})["request_summary"]

    assert long["estimated_input_tokens"] > short["estimated_input_tokens"]


# --- Nothing is stored --------------------------------------------------------------------------


def test_it_stores_nothing(alice: APIClient) -> None:
    validate(alice, VALID_REQUEST)
    validate(alice, {"messages": []})

    assert MessageJob.objects.count() == 0
    assert MessageEvent.objects.count() == 0


def test_async_refuses_an_invalid_body_with_every_error_and_stores_nothing(alice: APIClient) -> None:
    body = {
        "messages": [USER, {"role": "system", "content": "x"}],
        "tools": [{"name": "t", "input_schema": {"type": "string"}}],
        "priority": 11,
    }
    expected = [
        'messages[1].role: "system" is not one of user, assistant',
        'tools[0].input_schema: must be a JSON Schema with "type": "object"',
        "priority: must be at most 10",
    ]

    response = alice.post(ASYNC, body, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": expected[0], "errors": expected},
    }
    assert validate(alice, body)["errors"] == expected
    assert MessageJob.objects.count() == 0


class TestWhatAnthropicsSDKSends:
    def test_it_accepts_a_system_prompt_as_text_blocks_and_joins_them(self, alice: APIClient) -> None:
        from messaging.serializers import check_request

        body = {"messages": [USER], "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}]}

        assert validate(alice, body)["valid"] is True
        assert check_request(body, endpoint="sync").normalized()["system"] == {"prompt": "Be terse.\n\nBe kind."}

    def test_it_accepts_stop_sequences_and_metadata_and_says_metadata_is_not_sent(self, alice: APIClient) -> None:
        result = validate(alice, {"messages": [USER], "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}})

        assert result["valid"] is True
        assert result["warnings"] == ["metadata is kept with the message but not sent to the model"]

    def test_it_refuses_stop_sequences_that_are_not_strings(self, alice: APIClient) -> None:
        result = validate(alice, {"messages": [USER], "stop_sequences": ["END", 5]})

        assert result["errors"] == ["stop_sequences[1]: must be a string, not number"]


# --- Bad input is a 400 that says why, never a 500 ---------------------------------------------
# The same bodies go to POST /v1/messages in test_stream.py (it needs a real server).

NULL_ITEMS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "a null tool": ({"messages": [USER], "tools": [None]}, ["tools[0]: must be an object, not null"]),
    "a null tool after a good one": ({"messages": [USER], "tools": [TOOL, None]}, ["tools[1]: must be an object, not null"]),
    "a null tool and a tool_choice naming a tool": (
        {"messages": [USER], "tools": [None], "tool_choice": {"type": "tool", "name": "get_weather"}},
        ["tools[0]: must be an object, not null"],
    ),
    "a null MCP server": ({"messages": [USER], "mcp_servers": [None]}, ["mcp_servers[0]: must be an object, not null"]),
    "a null MCP server and a tool_call format": (
        {"messages": [USER], "mcp_servers": [MCP, None], "response_format": {"type": "tool_call", "name": "forecast"}},
        ["mcp_servers[1]: must be an object, not null"],
    ),
    "a null message": ({"messages": [None]}, ["messages[0]: must be an object, not null"]),
    "a null content block": (blocks(None), ["messages[0].content[0]: must be an object, not null"]),  # type: ignore[arg-type]
    "a null system block": ({"messages": [USER], "system": [None]}, ["system[0]: must be an object, not null"]),
    "a null image source": (blocks({"type": "image", "source": None}), ["messages[0].content[0].source: must be an object, not null"]),
    "a null tool_result block": (
        tool_turns(tool_result(content=[None])),
        ["messages[2].content[0].content[0]: must be an object, not null"],
    ),
    "a null stop sequence": ({"messages": [USER], "stop_sequences": ["END", None]}, ["stop_sequences[1]: must not be null"]),
    "a null allowed tool": (
        {"messages": [USER], "mcp_servers": [{**MCP, "tool_configuration": {"allowed_tools": [None]}}]},
        ["mcp_servers[0].tool_configuration.allowed_tools[0]: must not be null"],
    ),
    "a null tool_configuration": (
        {"messages": [USER], "mcp_servers": [{**MCP, "tool_configuration": None}]},
        ["mcp_servers[0].tool_configuration: must be an object, not null"],
    ),
}


@pytest.mark.parametrize(("body", "errors"), NULL_ITEMS.values(), ids=NULL_ITEMS.keys())
def test_a_null_where_an_object_or_string_goes_is_an_error_at_its_path(alice: APIClient, body: dict[str, Any], errors: list[str]) -> None:
    assert validate(alice, body)["errors"] == errors
    response = alice.post(ASYNC, json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["errors"] == errors
    assert MessageJob.objects.count() == 0


# (tool_context is the one list whose items may be null: see VALID_BODIES, "tool_context of any items".)


# C0 (with CR, LF and TAB), DEL, C1 (NEL) and the Unicode line and paragraph separators. (A NUL
# anywhere in a body is refused before any field is looked at: test_parsing.py.)
CONTROL_CHARACTERS = ["\r", "\n", "\r\n", "\t", "\x01", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\u2029"]


@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=[f"U+{ord(c[0]):04X}{'+' if len(c) > 1 else ''}" for c in CONTROL_CHARACTERS])
def test_it_refuses_a_control_character_in_correlation_id(alice: APIClient, character: str) -> None:
    body = {"messages": [USER], "correlation_id": f"order{character}42"}
    errors = [f"correlation_id: must not contain control characters (U+{ord(character[0]):04X} at index 5)"]

    assert validate(alice, body)["errors"] == errors
    response = alice.post(ASYNC, body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["errors"] == errors
    assert MessageJob.objects.count() == 0


def test_it_accepts_any_printable_text_in_correlation_id(alice: APIClient) -> None:
    assert validate(alice, {"messages": [USER], "correlation_id": "commande n°42, été — 東京 🌸 %41"})["valid"] is True


@pytest.mark.parametrize("url", ["http://[::1", "http://[not-an-address]/", "http://a]b/"])
def test_a_url_that_cannot_be_parsed_is_an_error_not_a_crash(alice: APIClient, url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}]}],
        "mcp_servers": [{**MCP, "url": url}],
    }

    result = validate(alice, body)

    assert result["errors"] == [
        "messages[0].content[0].source.url: must be an http(s) URL",
        "mcp_servers[0].url: must be an http(s) URL",
    ]
    assert alice.post(ASYNC, body, format="json").status_code == 400
