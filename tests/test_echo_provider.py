"""The echo provider: a deterministic model whose events look exactly like Anthropic's stream.

These tests need no database and no Django settings. The stream is async; each test runs it on
an event loop of its own (tests/aio.py), as the runner would.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, cast
from urllib.parse import urlparse

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from messaging.providers.base import ModelSpec, Provider, ProviderError
from messaging.providers.echo import NOTHING_TO_ECHO, EchoProvider, estimate_tokens, example_for_schema
from tests import aio

ECHO = ModelSpec(id="echo", provider="echo", max_tokens=8192, default_max_tokens=1024)
SLOW_DELAY = 0.01
ECHO_SLOW = ModelSpec(
    id="echo-slow", provider="echo", max_tokens=8192, default_max_tokens=1024, options={"delay": SLOW_DELAY}
)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
    },
}
TIME_TOOL = {
    "name": "get_time",
    "input_schema": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z_]+$"}},
        "required": ["timezone"],
        "additionalProperties": False,
    },
}

BLOCK_EVENTS = {"content_block_start", "content_block_delta", "content_block_stop"}
EVENT_TYPES = {"message_start", "message_delta", "message_stop"} | BLOCK_EVENTS


def user(*blocks: dict) -> dict:
    return {"role": "user", "content": list(blocks)}


def assistant(*blocks: dict) -> dict:
    return {"role": "assistant", "content": list(blocks)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def make_request(message: str | list[dict] = "Hello there, world!", **fields: Any) -> dict:
    """A request as the validator hands it over: normalized, every field present."""
    messages = [user(text(message))] if isinstance(message, str) else message
    request: dict[str, Any] = {
        "messages": messages,
        "system": None,
        "max_tokens": 1024,
        "tools": None,
        "tool_choice": None,
        "response_format": None,
        "thinking": None,
        "temperature": None,
    }
    request.update(fields)
    return request


def run(request: dict, spec: ModelSpec = ECHO, message_id: str = "msg_test") -> list[dict]:
    return aio.run(aio.collect(EchoProvider().stream(request, spec, message_id=message_id)))


def deltas(events: list[dict], kind: str = "text_delta") -> list[str]:
    field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return [e["delta"][field] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == kind]


def blocks(events: list[dict]) -> list[dict]:
    """The content blocks a client would assemble from the events."""
    assembled: list[dict] = []
    partial_json: dict[int, str] = {}
    for event in events:
        if event["type"] == "content_block_start":
            assembled.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = assembled[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json[event["index"]] = partial_json.get(event["index"], "") + delta["partial_json"]
        elif event["type"] == "content_block_stop" and event["index"] in partial_json:
            assembled[event["index"]]["input"] = json.loads(partial_json[event["index"]])
    return assembled


def final(events: list[dict]) -> dict:
    return next(e for e in events if e["type"] == "message_delta")


def assert_valid(instance: Any, schema: Any) -> None:
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(instance)


# --- text echo -------------------------------------------------------------------------------


def test_it_is_a_provider() -> None:
    assert isinstance(EchoProvider(), Provider)


def test_it_echoes_the_last_user_message_word_by_word() -> None:
    events = run(make_request("Hello there, world!"))

    assert deltas(events) == ["Hello ", "there, ", "world!"]
    assert blocks(events) == [{"type": "text", "text": "Hello there, world!"}]
    assert final(events)["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


@pytest.mark.parametrize(
    "message",
    ["  leading spaces", "tabs\tand\nnew lines\n\n  kept  ", "trailing space ", "one", "naïve café 🙂 ünïcode"],
)
def test_the_deltas_concatenate_to_the_exact_text_without_leading_whitespace(message: str) -> None:
    assert "".join(deltas(run(make_request(message)))) == message.lstrip()


def test_it_echoes_only_the_last_user_message() -> None:
    messages = [
        user(text("first question")),
        assistant(text("first answer")),
        user(text("second question")),
        assistant(text("a prefilled start")),
    ]

    assert blocks(run(make_request(messages)))[0]["text"] == "second question"


def test_the_text_blocks_of_the_last_user_message_are_joined_with_new_lines() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    messages = [user(text("look at this"), image, text("what is it?"))]

    assert blocks(run(make_request(messages)))[0]["text"] == "look at this\nwhat is it?"


def test_it_echoes_tool_results_when_the_last_user_message_has_no_text() -> None:
    messages = [
        user(text("what is the weather?")),
        assistant({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}),
        user(
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [text("and sunny")], "is_error": False},
        ),
    ]

    assert blocks(run(make_request(messages)))[0]["text"] == "15 degrees\nand sunny"


def test_it_echoes_a_fixed_phrase_when_there_is_nothing_to_echo() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}

    events = run(make_request([user(image)]))

    assert blocks(events)[0]["text"] == NOTHING_TO_ECHO
    assert final(events)["delta"]["stop_reason"] == "end_turn"


def test_whitespace_only_text_counts_as_nothing_to_echo() -> None:
    assert blocks(run(make_request("   \n ")))[0]["text"] == NOTHING_TO_ECHO


def test_it_ignores_the_system_prompt_and_sampling_fields() -> None:
    plain = run(make_request("same answer"))
    tuned = run(make_request("same answer", system={"prompt": "Be terse."}, temperature=0.2, top_p=0.5))

    assert blocks(tuned) == blocks(plain)


def test_the_same_request_gives_the_same_events() -> None:
    request = make_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024})

    assert run(request) == run(request)


# --- usage and max_tokens --------------------------------------------------------------------


def test_usage_reports_the_input_estimate_and_one_output_token_per_word() -> None:
    request = make_request("one two three four five")
    events = run(request)

    assert events[0]["message"]["usage"] == {"input_tokens": estimate_tokens(request), "output_tokens": 0}
    assert final(events)["usage"] == {"output_tokens": 5}


def test_it_stops_after_max_tokens_words_with_stop_reason_max_tokens() -> None:
    events = run(make_request("one two three four five", max_tokens=3))

    assert deltas(events) == ["one ", "two ", "three "]
    assert final(events)["delta"]["stop_reason"] == "max_tokens"
    assert final(events)["usage"] == {"output_tokens": 3}


def test_text_that_exactly_fits_max_tokens_ends_the_turn() -> None:
    events = run(make_request("one two three", max_tokens=3))

    assert deltas(events) == ["one ", "two ", "three"]
    assert final(events)["delta"]["stop_reason"] == "end_turn"


# --- event shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"max_tokens": 2},
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "any"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}, "tools": [WEATHER_TOOL], "tool_choice": {"type": "any"}},
    ],
)
def test_the_events_are_shaped_like_anthropic_streaming_events(fields: dict) -> None:
    events = run(make_request(**fields), message_id="msg_shape")

    assert all(event["type"] in EVENT_TYPES for event in events)
    assert [events[0]["type"], events[-2]["type"], events[-1]["type"]] == ["message_start", "message_delta", "message_stop"]
    assert events[0]["message"] == {
        "id": "msg_shape",
        "type": "message",
        "role": "assistant",
        "model": "echo",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": events[0]["message"]["usage"]["input_tokens"], "output_tokens": 0},
    }
    assert events[-1] == {"type": "message_stop"}
    assert set(events[-2]) == {"type", "delta", "usage"}

    block_events = events[1:-2]
    assert all(event["type"] in BLOCK_EVENTS and isinstance(event["index"], int) for event in block_events)
    starts = [event["index"] for event in block_events if event["type"] == "content_block_start"]
    stops = [event["index"] for event in block_events if event["type"] == "content_block_stop"]
    assert starts == stops == list(range(len(starts)))
    # Each block's events are contiguous: start, deltas, stop.
    indexes = [event["index"] for event in block_events]
    assert indexes == sorted(indexes)
    for event in block_events:
        if event["type"] == "content_block_delta":
            assert event["delta"]["type"] in {"text_delta", "thinking_delta", "signature_delta", "input_json_delta"}


def test_the_model_in_message_start_is_the_specs_public_id() -> None:
    assert run(make_request(), spec=ECHO_SLOW)[0]["message"]["model"] == "echo-slow"


# --- tools -----------------------------------------------------------------------------------


def test_a_tool_forced_by_name_is_called_with_input_matching_its_schema() -> None:
    request = make_request(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "tool", "name": "get_time"})
    events = run(request)

    [block] = blocks(events)
    assert block["type"] == "tool_use"
    assert block["name"] == "get_time"
    assert block["id"].startswith("toolu_")
    assert_valid(block["input"], TIME_TOOL["input_schema"])
    assert final(events)["delta"]["stop_reason"] == "tool_use"


def test_tool_choice_any_calls_the_first_tool() -> None:
    [block] = blocks(run(make_request(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "any"})))

    assert block["name"] == "get_weather"
    assert_valid(block["input"], WEATHER_TOOL["input_schema"])
    assert set(block["input"]) == {"location", "unit"}


def test_the_tool_use_block_starts_with_empty_input_and_streams_json_in_chunks() -> None:
    events = run(make_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"}))

    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"]["input"] == {}
    chunks = deltas(events, "input_json_delta")
    assert len(chunks) > 1
    assert json.loads("".join(chunks)) == blocks(events)[0]["input"]
    assert final(events)["usage"] == {"output_tokens": len(chunks)}


def test_tool_use_ids_are_deterministic_per_message() -> None:
    request = make_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"})

    first = blocks(run(request, message_id="msg_a"))[0]["id"]
    assert first == blocks(run(request, message_id="msg_a"))[0]["id"]
    assert first != blocks(run(request, message_id="msg_b"))[0]["id"]


@pytest.mark.parametrize("tool_choice", [None, {"type": "auto"}, {"type": "none"}])
def test_tools_are_not_called_unless_forced(tool_choice: dict | None) -> None:
    events = run(make_request("just echo", tools=[WEATHER_TOOL], tool_choice=tool_choice))

    assert blocks(events) == [{"type": "text", "text": "just echo"}]
    assert final(events)["delta"]["stop_reason"] == "end_turn"


def test_response_format_tool_call_uses_the_named_tool() -> None:
    request = make_request(tools=[WEATHER_TOOL, TIME_TOOL], response_format={"type": "tool_call", "name": "get_time"})
    events = run(request)

    [block] = blocks(events)
    assert block["name"] == "get_time"
    assert_valid(block["input"], TIME_TOOL["input_schema"])
    assert final(events)["delta"]["stop_reason"] == "tool_use"


def test_response_format_tool_call_without_a_name_uses_the_first_tool() -> None:
    [block] = blocks(run(make_request(tools=[WEATHER_TOOL, TIME_TOOL], response_format={"type": "tool_call"})))

    assert block["name"] == "get_weather"


def test_short_structured_output_is_never_cut_and_still_fits_max_tokens() -> None:
    events = run(make_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"}, max_tokens=1))

    assert len(deltas(events, "input_json_delta")) == 1
    assert_valid(blocks(events)[0]["input"], WEATHER_TOOL["input_schema"])
    assert final(events)["delta"]["stop_reason"] == "tool_use"
    assert final(events)["usage"] == {"output_tokens": 1}


def test_long_structured_output_comes_in_chunks_of_at_most_64_characters_one_token_each() -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1000}}, "required": ["text"]}
    events = run(make_request(response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}, max_tokens=100))

    pieces = deltas(events)
    assert len(json.loads("".join(pieces))["text"]) == 1000
    assert all(len(piece) <= 64 for piece in pieces)
    assert final(events)["delta"]["stop_reason"] == "end_turn"
    assert final(events)["usage"] == {"output_tokens": len(pieces)}


def _doubling(levels: int) -> dict:
    defs: dict[str, Any] = {
        f"l{n}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/l{n + 1}"}, "b": {"$ref": f"#/$defs/l{n + 1}"}}, "required": ["a", "b"]}
        for n in range(levels)
    }
    defs[f"l{levels}"] = {"type": "string", "minLength": 100}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


# Each asks for far more than max_tokens allows; a 180-byte request once stored a 30 MB result.
HUGE_SCHEMAS: dict[str, Any] = {
    "minLength": {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000_000}}, "required": ["text"]},
    "minItems": {"type": "object", "properties": {"list": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000_000}}, "required": ["list"]},
    "minProperties": {"type": "object", "minProperties": 100_000_000, "additionalProperties": {"type": "boolean"}},
    "nested minItems": {
        "type": "object",
        "properties": {"rows": {"type": "array", "minItems": 100_000, "items": {"type": "array", "minItems": 100_000, "items": {"type": "string", "minLength": 1000}}}},
        "required": ["rows"],
    },
    "a tree twice as wide at each of 30 levels": _doubling(30),
    "a const of a megabyte, many times": {"type": "object", "properties": {"list": {"type": "array", "items": {"const": "x" * 1_000_000}, "minItems": 1000}}, "required": ["list"]},
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schema", HUGE_SCHEMAS.values(), ids=HUGE_SCHEMAS.keys())
@pytest.mark.parametrize("answer", ["json_schema", "tool_use"])
def test_what_a_schema_demands_beyond_max_tokens_is_cut_there_with_stop_reason_max_tokens(schema: Any, answer: str) -> None:
    if answer == "tool_use":
        request = make_request(tools=[{"name": "huge", "input_schema": schema}], tool_choice={"type": "any"}, max_tokens=300)
    else:
        request = make_request(response_format={"type": "json_schema", "json_schema": {"name": "huge", "schema": schema}}, max_tokens=300)

    events = run(request)

    pieces = deltas(events, "input_json_delta" if answer == "tool_use" else "text_delta")
    assert final(events)["delta"]["stop_reason"] == "max_tokens"
    assert final(events)["usage"] == {"output_tokens": 300}
    assert len(pieces) == 300 and all(len(piece) <= 64 for piece in pieces)
    assert "".join(pieces).startswith('{"')


def test_thinking_and_a_cut_answer_share_max_tokens() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "huge", "schema": HUGE_SCHEMAS["minLength"]}}
    events = run(make_request("echo me please", response_format=response_format, thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=50))

    assert final(events)["delta"]["stop_reason"] == "max_tokens"
    assert final(events)["usage"] == {"output_tokens": 50}
    assert len(deltas(events, "thinking_delta")) + len(deltas(events)) == 50


@pytest.mark.timeout(60)
def test_a_pattern_whose_shortest_match_is_huge_still_gives_a_short_answer() -> None:
    # RE2 allows 1000 repetitions at a time, but not fewer characters in a row of them.
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^" + "a{1000}" * 50 + "$"}}, "required": ["code"]}
    events = run(make_request(response_format={"type": "json_schema", "json_schema": {"name": "code", "schema": schema}}, max_tokens=16))

    assert len("".join(deltas(events))) <= 16 * 64


# --- JSON output -----------------------------------------------------------------------------

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
    },
    "required": ["summary", "age", "tags"],
    "additionalProperties": False,
}


def test_json_schema_output_is_compact_json_that_validates() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    events = run(make_request("Describe me", response_format=response_format))

    [block] = blocks(events)
    assert block["type"] == "text"
    document = json.loads(block["text"])
    assert_valid(document, PERSON_SCHEMA)
    assert block["text"] == json.dumps(document, separators=(",", ":"))
    assert len(deltas(events)) > 1
    assert final(events)["delta"]["stop_reason"] == "end_turn"


def test_json_schema_output_puts_the_echoed_text_in_the_first_string() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}

    document = json.loads(blocks(run(make_request("Describe me", response_format=response_format)))[0]["text"])

    assert document["summary"] == "Describe me"


def test_a_forced_tool_wins_over_json_schema_output() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    request = make_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"}, response_format=response_format)

    assert blocks(run(request))[0]["type"] == "tool_use"


# --- thinking --------------------------------------------------------------------------------


def test_thinking_comes_first_and_is_signed_with_a_digest_of_its_text() -> None:
    events = run(make_request("echo me please", thinking={"type": "enabled", "budget_tokens": 1024}))

    thinking, answer = blocks(events)
    assert thinking["type"] == "thinking"
    assert thinking["thinking"] == "The user wrote 3 words; I will echo them back."
    assert thinking["signature"] == hashlib.sha256(thinking["thinking"].encode()).hexdigest()
    assert answer == {"type": "text", "text": "echo me please"}

    thinking_events = [e for e in events if e.get("index") == 0]
    kinds = [e["delta"]["type"] if e["type"] == "content_block_delta" else e["type"] for e in thinking_events]
    assert kinds[0] == "content_block_start"
    assert kinds[-2:] == ["signature_delta", "content_block_stop"]
    assert set(kinds[1:-2]) == {"thinking_delta"}
    assert thinking_events[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}


def test_thinking_words_count_as_output_tokens() -> None:
    events = run(make_request("echo me please", thinking={"type": "enabled", "budget_tokens": 1024}))

    assert final(events)["usage"]["output_tokens"] == len(deltas(events, "thinking_delta")) + 3


def test_thinking_that_uses_up_max_tokens_leaves_no_answer() -> None:
    events = run(make_request("echo me please", max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024}))

    assert [block["type"] for block in blocks(events)] == ["thinking"]
    assert len(deltas(events, "thinking_delta")) == 4
    assert final(events)["delta"]["stop_reason"] == "max_tokens"
    assert final(events)["usage"] == {"output_tokens": 4}


def test_thinking_before_a_tool_call_names_the_tool() -> None:
    request = make_request(
        tools=[WEATHER_TOOL], tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024}
    )

    thinking, tool_use = blocks(run(request))
    assert "get_weather" in thinking["thinking"]
    assert tool_use["type"] == "tool_use"


def test_disabled_thinking_emits_no_thinking_block() -> None:
    assert [block["type"] for block in blocks(run(make_request(thinking={"type": "disabled"})))] == ["text"]


# --- pacing and cancellation -----------------------------------------------------------------


def test_echo_slow_sleeps_before_each_word() -> None:
    message = "one two three four five six"
    started = time.monotonic()
    events = run(make_request(message), spec=ECHO_SLOW)
    elapsed = time.monotonic() - started

    assert len(deltas(events)) == 6
    assert elapsed >= 6 * SLOW_DELAY


def test_closing_the_stream_early_stops_it() -> None:
    stream = EchoProvider().stream(make_request("a b c d e f g h"), ECHO_SLOW, message_id="msg_cancel")

    async def close_after_three() -> tuple[list[dict], list[dict]]:
        return await aio.close_when(stream, lambda seen: len(seen) == 3), await aio.collect(stream)

    seen, after = aio.run(close_after_three())

    assert [event["type"] for event in seen] == ["message_start", "content_block_start", "content_block_delta"]
    assert after == []


def test_closing_the_stream_before_it_starts_is_harmless() -> None:
    async def close_then_read() -> list[dict]:
        stream = cast(AsyncGenerator[dict, None], EchoProvider().stream(make_request(), ECHO, message_id="msg_cancel"))
        await stream.aclose()
        return await aio.collect(stream)

    assert aio.run(close_then_read()) == []


def test_it_stops_in_the_middle_of_a_pause_when_cancelled() -> None:
    slow = ModelSpec(id="echo-slow", provider="echo", max_tokens=8192, default_max_tokens=1024, options={"delay": 60})
    stream = EchoProvider().stream(make_request("one two three"), slow, message_id="msg_c")

    # Cancelled after content_block_start: the next word waits 60 s.
    events, stopping = aio.run(aio.cancel_when(stream, lambda events: len(events) == 2))

    assert [e["type"] for e in events] == ["message_start", "content_block_start"]
    assert stopping < 1


@pytest.mark.timeout(60)
def test_building_a_large_example_leaves_the_event_loop_to_the_other_messages() -> None:
    # About half a second of CPU: a thousand-token answer of integers.
    request = make_request(tools=[{"name": "huge", "input_schema": HUGE_SCHEMAS["minItems"]}], tool_choice={"type": "any"}, max_tokens=8192)

    async def tick_while_building() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        stream = EchoProvider().stream(request, ECHO, message_id="msg_big")
        await anext(stream)  # message_start
        await anext(stream)  # the tool_use block, once the example is built
        ticker.cancel()
        return ticks

    assert aio.run(tick_while_building()) >= 5


# --- input token estimate --------------------------------------------------------------------


def test_the_estimate_is_about_one_token_per_four_characters() -> None:
    assert estimate_tokens(make_request("x" * 400)) == 100
    assert estimate_tokens(make_request("x" * 401)) == 101


def test_the_estimate_is_at_least_one() -> None:
    assert estimate_tokens(make_request([user(text(""))])) == 1
    assert estimate_tokens({"messages": []}) == 1


def test_the_estimate_counts_system_prompt_tool_blocks_and_tool_definitions() -> None:
    base = estimate_tokens(make_request("hello"))

    assert estimate_tokens(make_request("hello", system={"prompt": "s" * 400})) == base + 100
    assert estimate_tokens(make_request("hello", tools=[WEATHER_TOOL])) > base
    with_tool_turns = [
        user(text("hello")),
        assistant({"type": "thinking", "thinking": "t" * 40, "signature": "sig"},
                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "l" * 40}}),
        user({"type": "tool_result", "tool_use_id": "toolu_1", "content": [text("r" * 40)]}),
    ]
    assert estimate_tokens(make_request(with_tool_turns)) >= base + 30


def test_the_estimate_charges_images_a_fixed_cost_not_their_encoded_size() -> None:
    small = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 10}}
    large = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 100_000}}

    assert estimate_tokens(make_request([user(small)])) == estimate_tokens(make_request([user(large)]))
    assert estimate_tokens(make_request([user(small)])) > 1


# --- schema examples -------------------------------------------------------------------------

SCHEMAS: dict[str, Any] = {
    "weather tool": WEATHER_TOOL["input_schema"],
    "time tool with a pattern": TIME_TOOL["input_schema"],
    "empty object": {"type": "object"},
    "true": True,
    "empty schema": {},
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 3},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": r"^\d{5}(-\d{4})?$"}, "city": {"type": "string"}},
                        "required": ["zip", "city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "array of enums": {
        "type": "object",
        "properties": {
            "days": {
                "type": "array",
                "items": {"type": "string", "enum": ["mon", "tue", "wed"]},
                "minItems": 2,
                "uniqueItems": True,
            }
        },
        "required": ["days"],
    },
    "$defs refs": {
        "$defs": {
            "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
            "color": {"type": "string", "enum": ["red", "green"]},
        },
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 3},
            "color": {"$ref": "#/$defs/color"},
        },
        "required": ["points", "color"],
    },
    "definitions refs with an escaped pointer": {
        "definitions": {"a/b": {"type": "integer", "minimum": 7}},
        "type": "object",
        "properties": {"n": {"$ref": "#/definitions/a~1b"}},
        "required": ["n"],
    },
    "ref with sibling keywords": {
        "$defs": {"name": {"type": "string"}},
        "type": "object",
        "properties": {"name": {"$ref": "#/$defs/name", "minLength": 12}},
        "required": ["name"],
    },
    "type list with null": {"type": ["null", "integer"], "minimum": 3},
    "only null": {"type": "null"},
    "boolean": {"type": "boolean"},
    "const": {"const": {"kind": "fixed"}},
    "enum of numbers": {"enum": [3, 4]},
    "valid default": {"type": "integer", "default": 42, "minimum": 0},
    "invalid default": {"type": "integer", "default": -1, "minimum": 0},
    "anyOf with null": {"anyOf": [{"type": "null"}, {"type": "string"}]},
    "anyOf of objects": {
        "anyOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ]
    },
    "oneOf where the first branch overlaps": {
        "oneOf": [{"type": "integer"}, {"type": "integer", "minimum": -5}, {"type": "string"}],
    },
    "allOf merging objects": {
        "allOf": [
            {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
            {"type": "object", "properties": {"count": {"type": "integer", "minimum": 1}}, "required": ["count"]},
        ]
    },
    "integer bounds": {"type": "integer", "minimum": 10, "maximum": 20},
    "exclusive integer bounds": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 12},
    "negative range": {"type": "integer", "maximum": -3},
    "number exclusive bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "number above an exclusive minimum": {"type": "number", "exclusiveMinimum": 2.5},
    "multipleOf": {"type": "integer", "minimum": 10, "multipleOf": 7},
    "fractional multipleOf": {"type": "number", "minimum": 1.2, "multipleOf": 0.5},
    "string lengths": {"type": "string", "minLength": 20, "maxLength": 25},
    "short string": {"type": "string", "maxLength": 3},
    "patterns": {
        "type": "object",
        "properties": {
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"},
            "slug": {"type": "string", "pattern": "^[a-z0-9]+(?:-[a-z0-9]+)*$", "minLength": 1},
            "choice": {"type": "string", "pattern": "^(small|medium|large)$"},
            "not_at": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"},
            "unicode escape": {"type": "string", "pattern": "^\\u0041{2}-[\\u0430-\\u044f]$"},
            "unanchored": {"type": "string", "pattern": "x"},
        },
        "required": ["currency", "color", "slug", "choice", "not_at", "unicode escape", "unanchored"],
    },
    "formats": {
        "type": "object",
        "properties": {name: {"type": "string", "format": name} for name in ("date-time", "date", "email", "uri", "uuid", "ipv4", "ipv6")},
        "required": ["date-time", "date", "email", "uri", "uuid", "ipv4", "ipv6"],
    },
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "format": "date"}], "items": False},
    "array bounded by maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": 0},
    "array with contains": {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}},
    "unique integers": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "uniqueItems": True},
    "additionalProperties schema with minProperties": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 1},
        "minProperties": 2,
    },
    "required key only in patternProperties": {
        "type": "object",
        "patternProperties": {"^x-": {"type": "boolean"}},
        "required": ["x-flag"],
    },
    "boolean property schema": {"type": "object", "properties": {"anything": True}, "required": ["anything"]},
    "inferred types": {
        "properties": {"list": {"items": {"type": "string"}, "minItems": 1}, "text": {"minLength": 2}},
        "required": ["list", "text"],
    },
    "recursive tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["value", "children"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "linked list with a nullable next": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/item"}, {"type": "null"}]}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/item",
    },
}


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_the_schema_example_validates(schema: Any) -> None:
    instance = example_for_schema(schema)

    assert_valid(instance, schema)
    assert example_for_schema(schema) == instance


def test_the_schema_example_includes_required_properties_only() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["b"]}

    assert example_for_schema(schema) == {"b": "example"}
    assert example_for_schema({"type": "object", "properties": {"a": {"type": "string"}}}) == {}


def test_the_schema_example_prefers_const_then_enum_then_a_valid_default() -> None:
    assert example_for_schema({"const": "c", "enum": ["e"], "default": "d"}) == "c"
    assert example_for_schema({"enum": ["first", "second"], "default": "second"}) == "first"
    assert example_for_schema({"type": "string", "default": "chosen"}) == "chosen"
    assert example_for_schema({"type": "integer", "default": "not a number"}) == 0


def test_the_schema_example_gives_arrays_only_their_minimum_items() -> None:
    assert example_for_schema({"type": "array", "items": {"type": "integer"}}) == []
    assert example_for_schema({"type": "array", "items": {"type": "integer"}, "minItems": 2}) == [0, 0]
    assert example_for_schema(SCHEMAS["recursive tree"]) == {"value": 0, "children": []}


def test_the_schema_example_picks_the_first_non_null_type() -> None:
    assert example_for_schema({"type": ["null", "string", "integer"]}) == "example"


def test_the_schema_example_synthesizes_strings_for_patterns() -> None:
    assert example_for_schema({"type": "string", "pattern": "^[A-Z]{3}$"}) == "AAA"
    assert example_for_schema({"type": "string", "pattern": "^(small|medium|large)$"}) == "small"


def test_the_schema_example_falls_back_to_a_fixed_string_for_an_unsupported_pattern() -> None:
    # A conditional group is beyond the synthesizer; the result is a plain string, not an error.
    assert isinstance(example_for_schema({"type": "string", "pattern": "^(a)?(?(1)b|c)$"}), str)


def test_the_schema_example_formats_are_well_formed() -> None:
    schema = SCHEMAS["formats"]
    example = example_for_schema(schema)

    datetime.datetime.fromisoformat(example["date-time"].replace("Z", "+00:00"))
    datetime.date.fromisoformat(example["date"])
    uuid.UUID(example["uuid"])
    assert urlparse(example["uri"]).scheme == "https"
    assert "@" in example["email"]


def test_the_schema_example_uses_the_preferred_text_for_the_first_free_string_only() -> None:
    schema = {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}, "title": {"type": "string"}, "body": {"type": "string"}},
        "required": ["when", "title", "body"],
    }

    assert example_for_schema(schema, prefer_text="hi there") == {"when": "2024-01-01", "title": "hi there", "body": "example"}
    assert example_for_schema({"type": "string", "maxLength": 2}, prefer_text="hi there") == "hi"


def test_the_schema_example_gives_up_gracefully_on_unresolvable_refs_and_false() -> None:
    assert example_for_schema({"$ref": "https://example.com/remote.json"}) is None
    assert example_for_schema({"$ref": "#/$defs/missing"}) is None
    assert example_for_schema(False) is None


def test_the_schema_example_stops_at_a_depth_limit_for_required_recursion() -> None:
    # No finite instance exists; the point is to return instead of recursing forever.
    schema = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}

    example = example_for_schema(schema)

    depth = 0
    while isinstance(example, dict):
        example = example["child"]
        depth += 1
    assert 1 < depth < 100


# --- base types ------------------------------------------------------------------------------


def test_a_provider_error_says_whether_retrying_may_help() -> None:
    error = ProviderError("upstream overloaded", error_type="overloaded_error", retryable=True)

    assert str(error) == "upstream overloaded"
    assert (error.message, error.error_type, error.retryable) == ("upstream overloaded", "overloaded_error", True)
    assert (ProviderError("bad").error_type, ProviderError("bad").retryable) == ("api_error", False)


def test_a_model_spec_has_empty_supports_and_options_by_default_and_stays_hashable() -> None:
    spec = ModelSpec(id="echo", provider="echo", max_tokens=10, default_max_tokens=5)

    assert spec.supports == frozenset()
    assert spec.options == {}
    assert hash(ECHO_SLOW) == hash(ModelSpec("echo-slow", "echo", 8192, 1024, options={"delay": SLOW_DELAY}))


def test_it_stops_at_the_earliest_stop_sequence() -> None:
    events = run(make_request("one two STOP three END four", stop_sequences=["END", "STOP"]))

    assert "".join(deltas(events)) == "one two "
    assert next(e for e in events if e["type"] == "message_delta")["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


def test_a_stop_sequence_that_never_appears_changes_nothing() -> None:
    events = run(make_request("one two", stop_sequences=["never"]))

    assert next(e for e in events if e["type"] == "message_delta")["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
