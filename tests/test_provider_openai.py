"""The `openai` provider against a local server speaking OpenAI's streaming Chat Completions
over real HTTP (tests/upstreams.py): the request it sends, the events it yields, and what it
does when the upstream fails at every step.

The stream is async; each test runs it on an event loop of its own (tests/aio.py), as the
runner would. Retry waits go through an injected `sleep` that records them instead of sleeping,
and a `rand` of 1.0 makes the jitter its upper bound; timeouts are real but a fraction of a
second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from messaging import catalog, jobs, runner
from messaging.events import build_result
from messaging.models import MessageJob, Status
from messaging.providers.base import SAMPLING_FIELDS, ModelSpec, ProviderError
from messaging.providers.openai import OpenAIProvider, chat_completions_body
from messaging.providers.retry import Attempts, RetryPolicy, retry_after_seconds
from messaging.serializers import check_request
from tests import aio
from tests.processes import wait_until
from tests.upstreams import (
    Drip,
    OpenAIUpstream,
    Raw,
    Reply,
    Reset,
    Stall,
    chunk,
    error_reply,
    openai_upstream,  # noqa: F401 (a fixture)
    streamed,
    text_stream,
    tool_stream,
)

KEY = "sk-test-0123456789abcdefSECRET"
KEY_ENV = "HELPER_OPENAI_TEST_KEY"
ALL_SAMPLING = frozenset(SAMPLING_FIELDS)
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def model(upstream: OpenAIUpstream, *, supports: frozenset[str] = ALL_SAMPLING, **options: Any) -> ModelSpec:
    return ModelSpec(
        id="local-model",
        provider="openai",
        max_tokens=4096,
        default_max_tokens=256,
        supports=supports,
        options={
            "base_url": upstream.base_url,
            "upstream_model": "served-model",
            "api_key_env": KEY_ENV,
            "connect_timeout": 2,
            "read_timeout": 2,
            "max_attempts": 4,
            "retry_deadline": 60,
            "retry_base_delay": 0.1,
            "retry_max_delay": 0.3,
            **options,
        },
    )


class Sleeps(list):
    """Retry waits asked for, not waited."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def provider(sleeps: Sleeps) -> OpenAIProvider:
    return OpenAIProvider(sleep=sleeps, rand=lambda: 1.0)


def run(provider: OpenAIProvider, spec: ModelSpec, request: dict[str, Any] = HELLO) -> tuple[list[dict[str, Any]], ProviderError | None]:
    events: list[dict[str, Any]] = []
    try:
        aio.run(aio.collect(provider.stream(request, spec, message_id="msg_test"), events))
    except ProviderError as error:
        assert KEY not in error.message and KEY not in str(error)
        return events, error
    return events, None


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def start_event() -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": "local-model",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        },
    }


TEXT_EVENTS: list[dict[str, Any]] = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"input_tokens": 10, "output_tokens": 3}},
    {"type": "message_stop"},
]


# --- streaming ---------------------------------------------------------------------------------


def test_it_streams_text_as_anthropic_events_with_the_final_usage(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(text_stream("Hello", " there")))
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events == [start_event(), *TEXT_EVENTS]
    assert openai_upstream.attempts == 1


def test_it_streams_tool_calls_as_tool_use_blocks_with_their_argument_fragments(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(
        streamed(tool_stream(("call_a", "get_weather", ['{"ci', 'ty": "Par', 'is"}']), ("call_b", "get_time", ["{}"])))
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events[1:5] == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": 'ty": "Par'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": 'is"}'}},
    ]
    result = build_result(events)
    assert result is not None
    assert result["content"] == [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
    ]
    assert result["stop_reason"] == "tool_use"
    assert result["usage"] == {"input_tokens": 20, "output_tokens": 9}


def test_a_forced_tool_that_ends_with_stop_still_ends_as_tool_use(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    # OpenAI answers a named tool_choice with finish_reason "stop", not "tool_calls".
    openai_upstream.script(streamed(tool_stream(("call_a", "lookup", ['{"q": 1}']), finish_reason="stop")))
    events, _ = run(provider, model(openai_upstream))
    assert build_result(events)["stop_reason"] == "tool_use"  # type: ignore[index]


def test_a_tool_call_whose_name_comes_late_opens_its_block_once_named(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(
        streamed(
            [
                chunk({"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"arguments": '{"a"'}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"name": "late", "arguments": ": 2}"}}]}),
                chunk({}, "tool_calls"),
                "[DONE]",
            ]
        )
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    result = build_result(events)
    assert result is not None
    assert result["content"] == [{"type": "tool_use", "id": "call_x", "name": "late", "input": {"a": 2}}]


def test_reasoning_content_becomes_a_thinking_block_before_the_text(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(
        streamed(
            [
                chunk({"role": "assistant", "content": ""}),
                chunk({"reasoning_content": "Let me "}),
                chunk({"reasoning_content": "think."}),
                chunk({"content": "Answer."}),
                chunk({}, "stop"),
                "[DONE]",
            ]
        )
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert types(events) == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    result = build_result(events)
    assert result is not None
    assert result["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": ""},
        {"type": "text", "text": "Answer."},
    ]
    # No usage chunk: one output token per delta, and no input count to report.
    assert events[-2]["usage"] == {"output_tokens": 3}


@pytest.mark.parametrize(
    ("finish_reason", "choice", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("content_filter", {}, "refusal", None),
        ("tool_calls", {}, "tool_use", None),
        # vLLM names the stop string that ended the answer.
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),
    ],
)
def test_finish_reasons_map_to_stop_reasons(
    openai_upstream: OpenAIUpstream,
    provider: OpenAIProvider,
    finish_reason: str,
    choice: dict[str, Any],
    stop_reason: str,
    stop_sequence: str | None,
) -> None:
    openai_upstream.script(streamed(text_stream("Hi", finish_reason=finish_reason, **choice)))
    events, _ = run(provider, model(openai_upstream), {**HELLO, "stop_sequences": ["END"]})
    assert events[-2]["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}


def test_a_json_answer_streams_as_text(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(text_stream('{"answer"', ": 42}")))
    request = {**HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    events, error = run(provider, model(openai_upstream), request)
    assert error is None
    assert build_result(events)["content"] == [{"type": "text", "text": '{"answer": 42}'}]  # type: ignore[index]


# --- the request -------------------------------------------------------------------------------

FULL_REQUEST: dict[str, Any] = {
    "system": {"prompt": "Be brief."},
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "They want the weather.", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Nice"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "unknown city"}], "is_error": True},
                {"type": "text", "text": "And now?"},
            ],
        },
    ],
    "tools": [
        {"name": "get_weather", "description": "The weather in a city.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "temperature": 0.5,
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "seed": 7,
    "stop_sequences": ["END"],
    "max_tokens": 300,
    "correlation_id": "order-42",
    "metadata": {"user_id": "u1"},
    "thinking": {"type": "disabled"},
}


def test_it_sends_the_request_translated_to_chat_completions(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(tool_stream(("call_a", "get_weather", ["{}"]))))
    run(provider, model(openai_upstream), FULL_REQUEST)
    [received] = openai_upstream.requests
    assert received.path == "/v1/chat/completions"
    assert received.body == {
        "model": "served-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: unknown city"},
            {"role": "user", "content": "And now?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 300,
        "temperature": 0.5,
        "min_p": 0.05,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "seed": 7,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.headers["x-correlation-id"] == "order-42"
    assert received.headers["accept"] == "text/event-stream"


def test_it_sends_no_authorization_header_without_api_key_env(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(text_stream("Hi")))
    run(provider, model(openai_upstream, api_key_env=None))
    [received] = openai_upstream.requests
    assert "authorization" not in received.headers


def test_a_missing_key_variable_fails_without_calling_the_upstream(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    events, error = run(provider, model(openai_upstream))
    assert events == []
    assert error is not None and not error.retryable and KEY_ENV in error.message
    assert openai_upstream.attempts == 0


def test_a_correlation_id_outside_ascii_is_percent_encoded_in_its_header(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(text_stream("Hi")))
    run(provider, model(openai_upstream), {**HELLO, "correlation_id": "commande-é\n42"})
    assert openai_upstream.requests[0].headers["x-correlation-id"] == "commande-%C3%A9%0A42"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": {"type": "auto"}}, {"tool_choice": "auto"}),
        ({"tool_choice": {"type": "any"}}, {"tool_choice": "required"}),
        ({"tool_choice": {"type": "none"}}, {"tool_choice": "none"}),
        ({"response_format": {"type": "tool_call", "name": "t"}}, {"tool_choice": {"type": "function", "function": {"name": "t"}}}),
        ({"response_format": {"type": "tool_call"}}, {"tool_choice": "required"}),
        ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}, {"tool_choice": "auto", "parallel_tool_calls": False}),
        ({}, {}),
    ],
)
def test_tool_choice_and_tool_call_formats_translate_to_openai_tool_choice(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    request = {**HELLO, "tools": [{"name": "t", "input_schema": {"type": "object"}}], **fields}
    body = chat_completions_body(request, ModelSpec(id="m", provider="openai", max_tokens=10, default_max_tokens=5))
    assert {name: body[name] for name in ("tool_choice", "parallel_tool_calls") if name in body} == expected


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
        ),
        ({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}, {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}),
        ({"type": "text"}, None),
    ],
)
def test_response_formats_translate_to_openai_response_format(response_format: dict[str, Any], expected: dict[str, Any] | None) -> None:
    body = chat_completions_body({**HELLO, "response_format": response_format}, ModelSpec(id="m", provider="openai", max_tokens=10, default_max_tokens=5))
    assert body.get("response_format") == expected


def test_only_the_sampling_fields_the_model_supports_are_sent() -> None:
    # The others drew a warning saying they are ignored; OpenAI itself answers 400 to top_k.
    spec = ModelSpec(id="m", provider="openai", max_tokens=10, default_max_tokens=5, supports=frozenset({"temperature"}))
    body = chat_completions_body({**HELLO, "temperature": 0.2, "top_k": 5, "min_p": 0.1, "seed": None}, spec)
    assert body["temperature"] == 0.2
    assert not {"top_k", "min_p", "seed"} & set(body)


def test_max_tokens_goes_in_the_field_the_model_names() -> None:
    spec = ModelSpec(id="m", provider="openai", max_tokens=10, default_max_tokens=5, options={"max_tokens_field": "max_completion_tokens"})
    body = chat_completions_body(HELLO, spec)
    assert body["max_completion_tokens"] == 50 and "max_tokens" not in body


# --- failures before the answer starts -----------------------------------------------------------


def test_a_server_error_is_retried_and_then_the_answer_streams(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps
) -> None:
    openai_upstream.script(error_reply(500, "The server had an error", error_type="server_error"), streamed(text_stream("Hello", " there")))
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events == [start_event(), *TEXT_EVENTS]
    assert openai_upstream.attempts == 2
    assert sleeps == [0.1]


def test_server_errors_are_retried_with_exponential_backoff_until_the_attempts_run_out(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps
) -> None:
    openai_upstream.script(*(error_reply(status, f"failure {status}", error_type="server_error") for status in (500, 502, 503, 504)))
    events, error = run(provider, model(openai_upstream))
    assert events == []
    assert error is not None
    assert error.retryable
    assert error.error_type == "api_error"
    assert error.message == 'The openai provider for model "local-model" answered 504 (4 attempts): failure 504'
    assert openai_upstream.attempts == 4
    # Full jitter at its upper bound (rand = 1.0): 0.1, 0.2, then capped at retry_max_delay.
    assert sleeps == [0.1, 0.2, 0.3]


def test_a_429_waits_as_long_as_retry_after_says(openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps) -> None:
    openai_upstream.script(
        error_reply(429, "Rate limit reached", error_type="rate_limit_error", headers={"Retry-After": "2"}),
        streamed(text_stream("Hello", " there")),
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None and events[-1] == {"type": "message_stop"}
    assert openai_upstream.attempts == 2
    assert sleeps == [2.0]


def test_a_429_with_an_http_date_retry_after_waits_until_that_date(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps
) -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    openai_upstream.script(
        error_reply(429, "Rate limit reached", error_type="rate_limit_error", headers={"Retry-After": later}),
        streamed(text_stream("Hi")),
    )
    _, error = run(provider, model(openai_upstream))
    assert error is None
    [waited] = sleeps
    assert 18 < waited <= 20


def test_a_429_whose_retry_after_ends_past_the_deadline_fails_at_once(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps
) -> None:
    openai_upstream.script(error_reply(429, "Rate limit reached", error_type="rate_limit_error", headers={"Retry-After": "30"}))
    events, error = run(provider, model(openai_upstream, retry_deadline=5))
    assert events == []
    assert error is not None and error.retryable and error.error_type == "rate_limit_error"
    assert "Rate limit reached" in error.message
    assert openai_upstream.attempts == 1
    assert sleeps == []


def test_a_529_overload_is_retried(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(error_reply(529, "Overloaded", error_type="overloaded_error"), streamed(text_stream("Hi")))
    events, error = run(provider, model(openai_upstream))
    assert error is None and events[-1] == {"type": "message_stop"}
    assert openai_upstream.attempts == 2


def test_a_400_fails_at_once_with_the_servers_message(openai_upstream: OpenAIUpstream, provider: OpenAIProvider, sleeps: Sleeps) -> None:
    openai_upstream.script(error_reply(400, "Invalid value for 'tool_choice': unknown tool 'x'."))
    events, error = run(provider, model(openai_upstream))
    assert events == []
    assert error is not None
    assert not error.retryable
    assert error.error_type == "invalid_request_error"
    assert error.message.endswith("answered 400: Invalid value for 'tool_choice': unknown tool 'x'.")
    assert openai_upstream.attempts == 1
    assert sleeps == []


def test_an_error_message_that_repeats_the_key_has_it_redacted(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(error_reply(401, f"Incorrect API key provided: {KEY}.", error_type="invalid_api_key"))
    _, error = run(provider, model(openai_upstream))
    assert error is not None and error.error_type == "authentication_error" and not error.retryable
    assert "Incorrect API key provided: [redacted]." in error.message


def test_a_server_silent_past_the_read_timeout_before_answering_is_retried(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(Reply(delay=5, stream=text_stream("late")), streamed(text_stream("Hello", " there")))
    events, error = run(provider, model(openai_upstream, read_timeout=0.2))
    assert error is None
    assert events == [start_event(), *TEXT_EVENTS]
    assert openai_upstream.attempts == 2


def test_a_refused_connection_is_retried_then_fails_as_retryable(provider: OpenAIProvider, sleeps: Sleeps) -> None:
    upstream = OpenAIUpstream()
    upstream.close()  # nothing listens on its port any more
    events, error = run(provider, model(upstream))
    assert events == []
    assert error is not None and error.retryable
    assert error.message.startswith('The connection to the openai provider for model "local-model" failed: ')
    assert error.message.endswith("(4 attempts).") and "127.0.0.1" not in error.message
    assert len(sleeps) == 3


def test_an_invalid_base_url_fails_at_once(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    _, error = run(provider, model(openai_upstream, base_url="ftp://example.com/v1"))
    assert error is not None and not error.retryable


# --- failures in the middle of the answer --------------------------------------------------------


def restarted(first_attempt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of an attempt cut after `first_attempt`, then a complete second one."""
    return [start_event(), *first_attempt, start_event(), *TEXT_EVENTS]


PARTIAL: list[dict[str, Any]] = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_stop", "index": 0},
]


def test_a_connection_reset_mid_stream_restarts_the_answer_from_scratch(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(
        streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), Reset()]),
        streamed(text_stream("Hello", " there")),
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events == restarted(PARTIAL)
    assert build_result(events)["content"] == [{"type": "text", "text": "Hello there"}]  # type: ignore[index]
    assert openai_upstream.attempts == 2


def test_a_stream_silent_past_the_read_timeout_restarts_the_answer(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(
        streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), Stall(5), chunk({"content": "lo"})]),
        streamed(text_stream("Hello", " there")),
    )
    events, error = run(provider, model(openai_upstream, read_timeout=0.2))
    assert error is None
    assert events == restarted(PARTIAL)
    assert openai_upstream.attempts == 2


def test_a_stream_that_ends_before_a_finish_reason_restarts_the_answer(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(
        streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"})]),
        streamed(text_stream("Hello", " there")),
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events == restarted(PARTIAL)


def test_a_cut_with_no_attempt_left_fails_as_retryable_with_the_partial_answer_closed(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(
        streamed(
            [
                chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a":'}}]}),
                Reset(),
            ]
        )
    )
    events, error = run(provider, model(openai_upstream, max_attempts=1))
    assert error is not None and error.retryable
    assert "after the model started answering (1 attempt)" in error.message
    assert types(events) == ["message_start", "content_block_start", "content_block_delta", "content_block_stop"]
    assert openai_upstream.attempts == 1


def test_a_malformed_chunk_fails_the_message_and_keeps_what_came_before(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(
        streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), Raw(b'data: {"choices": [\n\n')])
    )
    events, error = run(provider, model(openai_upstream))
    assert error is not None and not error.retryable
    assert "malformed chunk" in error.message
    assert events == [start_event(), *PARTIAL]
    assert openai_upstream.attempts == 1


def test_an_error_object_in_the_stream_fails_the_message_with_its_message(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(
        streamed([chunk({"content": "Hel"}), {"error": {"message": "Context length exceeded", "type": "invalid_request_error", "code": 400}}])
    )
    events, error = run(provider, model(openai_upstream))
    assert error is not None and not error.retryable
    assert error.message.endswith("reported an error in the stream: Context length exceeded")
    assert events == [start_event(), *PARTIAL]


def test_a_server_error_object_in_the_stream_restarts_the_answer(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(
        streamed([chunk({"content": "Hel"}), {"error": {"message": "The server had an error", "type": "server_error", "code": None}}]),
        streamed(text_stream("Hello", " there")),
    )
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events == restarted(PARTIAL)


def test_a_stream_that_finished_but_lost_its_usage_and_done_still_completes(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider
) -> None:
    openai_upstream.script(streamed([chunk({"content": "Hi"}), chunk({}, "stop"), Reset()]))
    events, error = run(provider, model(openai_upstream))
    assert error is None
    assert events[-2:] == [
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]
    assert openai_upstream.attempts == 1


# --- cancellation --------------------------------------------------------------------------------
# The runner cancels the task that iterates a stream (a cancelled message, its time limit) or
# closes the stream. Either way the stream stops at once, even while the upstream is silent, and
# the upstream sees its connection close: the model stops generating.


def test_closing_the_stream_closes_the_upstream_connection_at_once(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), Drip()]))
    stream = provider.stream(HELLO, model(openai_upstream), message_id="msg_test")

    events = aio.run(aio.close_when(stream, lambda events: events[-1]["type"] == "content_block_delta"))

    assert types(events)[-1] == "content_block_delta"
    wait_until(lambda: openai_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")


def test_a_cancel_while_the_model_is_silent_stops_at_once_and_closes_the_upstream_connection(openai_upstream: OpenAIUpstream) -> None:
    openai_upstream.script(streamed([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), Stall(30)]))
    stream = OpenAIProvider().stream(HELLO, model(openai_upstream, read_timeout=30), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda events: len(events) == 3))

    assert events == [start_event(), *PARTIAL[:2]]
    assert stopping < 1
    wait_until(lambda: openai_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")
    assert openai_upstream.attempts == 1


def test_a_cancel_while_waiting_for_the_response_stops_at_once_and_closes_the_upstream_connection(openai_upstream: OpenAIUpstream) -> None:
    openai_upstream.script(Reply(delay=30, stream=text_stream("late")))
    stream = OpenAIProvider().stream(HELLO, model(openai_upstream, read_timeout=30), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda _: openai_upstream.attempts == 1))

    assert events == [] and stopping < 1
    wait_until(lambda: openai_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")


def test_a_cancel_during_a_retry_wait_stops_at_once_without_another_attempt(openai_upstream: OpenAIUpstream) -> None:
    openai_upstream.script(error_reply(429, "Slow down", error_type="rate_limit_error", headers={"Retry-After": "20"}))
    waits = aio.CountedSleep()
    stream = OpenAIProvider(sleep=waits).stream(HELLO, model(openai_upstream), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda _: waits.begun == 1))

    assert events == [] and stopping < 1
    assert openai_upstream.attempts == 1


# --- connections ---------------------------------------------------------------------------------


def test_consecutive_messages_share_one_kept_alive_connection(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(streamed(text_stream("Hello", " there")), streamed(text_stream("Hello", " there")))

    async def two_messages() -> list[list[dict[str, Any]]]:
        return [await aio.collect(provider.stream(HELLO, model(openai_upstream), message_id="msg_test")) for _ in range(2)]

    assert aio.run(two_messages()) == [[start_event(), *TEXT_EVENTS]] * 2
    assert len({received.client_port for received in openai_upstream.requests}) == 1


def run_at_once(provider: OpenAIProvider, spec: ModelSpec, count: int) -> list[list[dict[str, Any]]]:
    async def all_at_once() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(aio.collect(provider.stream(HELLO, spec, message_id=f"msg_{n}")) for n in range(count)))

    return aio.run(all_at_once())


def test_hundreds_of_messages_in_flight_are_not_held_back_by_a_connection_limit(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    # httpx allows 100 connections by default: the runner alone bounds what is in flight.
    openai_upstream.script(*(Reply(delay=1, stream=text_stream("Hello", " there")) for _ in range(200)))

    answers = run_at_once(provider, model(openai_upstream), 200)

    assert all(types(events)[-1] == "message_stop" for events in answers)
    assert openai_upstream.attempts == 200
    assert openai_upstream.peak_in_flight >= 150


def test_a_models_max_connections_bounds_its_calls_in_flight(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    openai_upstream.script(*(Reply(delay=0.1, stream=text_stream("Hello", " there")) for _ in range(12)))

    answers = run_at_once(provider, model(openai_upstream, max_connections=3), 12)

    assert all(types(events)[-1] == "message_stop" for events in answers)
    assert openai_upstream.peak_in_flight == 3


# --- what a failure says ------------------------------------------------------------------------
# The provider and the configured model, never the upstream's address: a failure is stored,
# streamed, answered and logged, and base URLs are the operator's (internal hosts, ports).

NAME = 'The openai provider for model "local-model"'


def address(upstream: OpenAIUpstream) -> str:
    return upstream.base_url.split("//")[1].split("/")[0]  # 127.0.0.1:<port>


FAILURES: dict[str, tuple[Callable[[str], list[Reply]], dict[str, Any], str]] = {
    "a 400 that repeats the upstream's address": (
        lambda at: [error_reply(400, f"No such tool at http://{at}/v1 ({at.split(':')[0]})")],
        {},
        f"{NAME} answered 400: No such tool at [model server] ([model server])",
    ),
    "server errors until the attempts run out": (
        lambda at: [error_reply(500, "failure", error_type="server_error")] * 4,
        {},
        f"{NAME} answered 500 (4 attempts): failure",
    ),
    "a timeout": (lambda at: [Reply(delay=5, stream=text_stream("late"))], {"read_timeout": 0.2, "max_attempts": 1}, f"{NAME} did not answer within its timeout (ReadTimeout) (1 attempt)."),
    "not an event stream": (
        lambda at: [Reply(headers={"Content-Type": "text/html"}, body=b"<html>" + at.encode())],
        {},
        f"{NAME} answered with text/html instead of an event stream.",
    ),
    "a malformed chunk": (lambda at: [streamed([Raw(b"data: nope\n\n")])], {}, f"{NAME} sent a malformed chunk (not JSON)."),
    "an error in the stream": (
        lambda at: [streamed([{"error": {"message": f"{at} is draining", "type": "invalid_request_error"}}])],
        {},
        f"{NAME} reported an error in the stream: [model server] is draining",
    ),
}


@pytest.mark.parametrize(("replies", "options", "message"), FAILURES.values(), ids=FAILURES.keys())
def test_a_failure_names_the_provider_and_model_never_the_upstreams_address(
    openai_upstream: OpenAIUpstream, provider: OpenAIProvider, caplog: pytest.LogCaptureFixture,
    replies: Callable[[str], list[Reply]], options: dict[str, Any], message: str,
) -> None:
    caplog.set_level("INFO")
    openai_upstream.script(*replies(address(openai_upstream)))

    _, error = run(provider, model(openai_upstream, **options))

    assert error is not None and error.message == message
    assert "127.0.0.1" not in caplog.text and address(openai_upstream).split(":")[1] not in caplog.text


def test_an_unusable_base_url_is_named_without_the_url(openai_upstream: OpenAIUpstream, provider: OpenAIProvider) -> None:
    _, error = run(provider, model(openai_upstream, base_url="ftp://user:secret@files.internal:2121/v1"))

    assert error is not None
    assert error.message == f"Cannot call {NAME[0].lower() + NAME[1:]}: its base_url cannot be used (UnsupportedProtocol)."


# --- through the runner --------------------------------------------------------------------------


def test_a_message_on_an_openai_model_completes_through_the_runner(
    transactional_db: None, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", model(openai_upstream))
    openai_upstream.script(error_reply(503, "busy", error_type="server_error"), streamed(text_stream("Hello", " there")))
    checked = check_request({"model": "local-model", "messages": [{"role": "user", "content": "Hi"}], "correlation_id": "c-1"}, endpoint="async")
    assert checked.valid, checked.errors
    jobs.accept("alice", checked)
    job = MessageJob.objects.get(message_id=runner.run_one())
    assert job.status == Status.COMPLETED
    assert job.result["content"] == [{"type": "text", "text": "Hello there"}]
    assert job.result["usage"] == {"input_tokens": 10, "output_tokens": 3}
    assert openai_upstream.attempts == 2
    assert openai_upstream.requests[1].body["max_tokens"] == 256
    assert openai_upstream.requests[1].headers["x-correlation-id"] == "c-1"


def test_a_message_whose_upstream_refuses_it_ends_failed_without_the_key(
    transactional_db: None, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", model(openai_upstream))
    openai_upstream.script(error_reply(401, f"Incorrect API key provided: {KEY}.", error_type="invalid_api_key"))
    checked = check_request({"model": "local-model", "messages": [{"role": "user", "content": "Hi"}]}, endpoint="async")
    jobs.accept("alice", checked)
    job = MessageJob.objects.get(message_id=runner.run_one())
    assert job.status == Status.FAILED
    assert job.error["type"] == "authentication_error"
    assert job.error["message"] == f"{NAME} answered 401: Incorrect API key provided: [redacted]."
    events = str(list(job.events.values_list("data", flat=True)))
    assert KEY not in str(job.error) and KEY not in events
    assert address(openai_upstream) not in events


# --- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("-1", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


def test_retry_after_reads_a_future_http_date_relative_to_now() -> None:
    midnight = datetime(2099, 1, 1, tzinfo=timezone.utc).timestamp()
    assert retry_after_seconds("Thu, 01 Jan 2099 00:00:10 GMT", now=lambda: midnight) == 10.0


# --- the retry policy ----------------------------------------------------------------------------


def test_the_retry_policy_says_how_long_to_wait_until_no_attempt_is_left() -> None:
    attempts = Attempts(RetryPolicy(max_attempts=3, deadline=60, base_delay=1, max_delay=3), clock=lambda: 0.0, rand=lambda: 1.0)
    waits = []
    while True:
        attempts.start()
        delay = attempts.delay_before_retry()
        if delay is None:
            break
        waits.append(delay)
    assert waits == [1.0, 2.0]
    assert attempts.count == 3


def test_a_wait_that_would_end_past_the_deadline_is_not_started() -> None:
    now = 0.0
    attempts = Attempts(RetryPolicy(max_attempts=10, deadline=10), clock=lambda: now, rand=lambda: 1.0)
    attempts.start()
    assert attempts.delay_before_retry(retry_after=10) == 10
    assert attempts.delay_before_retry(retry_after=10.5) is None
    now = 8.0
    assert attempts.delay_before_retry() == 0.5
    assert attempts.delay_before_retry(retry_after=3) is None
