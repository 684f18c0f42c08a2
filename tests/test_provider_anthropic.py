"""The `anthropic` provider against a local server speaking Anthropic's streaming Messages API
over real HTTP (tests/upstreams.py): the request it sends, the events it yields, and what it
does when the upstream fails at every step.

The stream is async; each test runs it on an event loop of its own (tests/aio.py), as the
runner would. Retry waits go through an injected `sleep` that records them instead of sleeping,
and a `rand` of 1.0 makes the jitter its upper bound; timeouts are real but a fraction of a
second.
"""

from __future__ import annotations

from typing import Any

import pytest

from messaging import catalog, jobs, runner
from messaging.events import build_result
from messaging.models import MessageJob, Status
from messaging.providers.anthropic import AnthropicProvider, messages_body
from messaging.providers.base import ModelSpec, ProviderError
from messaging.serializers import check_request
from tests import aio
from tests.processes import wait_until
from tests.upstreams import (
    AnthropicUpstream,
    Drip,
    Raw,
    Reply,
    Reset,
    Stall,
    anthropic_block,
    anthropic_end,
    anthropic_error_reply,
    anthropic_start,
    anthropic_streamed,
    anthropic_text_stream,
    anthropic_upstream,  # noqa: F401 (a fixture)
)

KEY = "sk-ant-test-0123456789abcdefSECRET"
KEY_ENV = "HELPER_ANTHROPIC_TEST_KEY"
HELLO = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 50}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def model(upstream: AnthropicUpstream, *, supports: frozenset[str] = catalog.DEFAULT_SUPPORTS["anthropic"], **options: Any) -> ModelSpec:
    return ModelSpec(
        id="claude-local",
        provider="anthropic",
        max_tokens=4096,
        default_max_tokens=256,
        supports=supports,
        options={
            "base_url": upstream.base_url,
            "upstream_model": "claude-served",
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
def provider(sleeps: Sleeps) -> AnthropicProvider:
    return AnthropicProvider(sleep=sleeps, rand=lambda: 1.0)


def run(provider: AnthropicProvider, spec: ModelSpec, request: dict[str, Any] = HELLO) -> tuple[list[dict[str, Any]], ProviderError | None]:
    events: list[dict[str, Any]] = []
    try:
        aio.run(aio.collect(provider.stream(request, spec, message_id="msg_test"), events))
    except ProviderError as error:
        assert KEY not in error.message and KEY not in str(error)
        return events, error
    assert KEY not in str(events)
    return events, None


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def start_event(**usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": "claude-local",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1, **usage},
        },
    }


TEXT_EVENTS: list[dict[str, Any]] = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 3}},
    {"type": "message_stop"},
]


# --- streaming ---------------------------------------------------------------------------------


def test_it_passes_text_events_through_with_our_message_id_and_model(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed(anthropic_text_stream("Hello", " there")))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    # The ping is dropped; the upstream's message id and served model are replaced by ours.
    assert events == [start_event(), *TEXT_EVENTS]
    assert anthropic_upstream.attempts == 1


def test_thinking_streams_with_its_signature_before_the_text(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(
        anthropic_streamed(
            [
                anthropic_start(),
                *anthropic_block(
                    0,
                    {"type": "thinking", "thinking": "", "signature": ""},
                    {"type": "thinking_delta", "thinking": "Let me "},
                    {"type": "thinking_delta", "thinking": "think."},
                    {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
                ),
                *anthropic_block(1, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Answer."}),
                *anthropic_end(output_tokens=12),
            ]
        )
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events[4] == {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}
    result = build_result(events)
    assert result is not None
    assert result["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Answer."},
    ]


def test_tool_use_streams_with_its_input_json_fragments(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(
        anthropic_streamed(
            [
                anthropic_start(input_tokens=20),
                *anthropic_block(
                    0,
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
                    {"type": "input_json_delta", "partial_json": ""},
                    {"type": "input_json_delta", "partial_json": '{"ci'},
                    {"type": "input_json_delta", "partial_json": 'ty": "Paris"}'},
                ),
                *anthropic_end("tool_use", output_tokens=9),
            ]
        )
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events[3] == {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}}
    result = build_result(events)
    assert result is not None
    assert result["content"] == [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]
    assert result["stop_reason"] == "tool_use"
    assert result["usage"] == {"input_tokens": 20, "output_tokens": 9}


def test_usage_combines_the_start_counts_with_the_final_output_count(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(
        anthropic_streamed(
            [
                anthropic_start(input_tokens=7, cache_creation_input_tokens=100, cache_read_input_tokens=2000),
                *anthropic_block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Hi"}),
                *anthropic_end("max_tokens", output_tokens=50),
            ]
        )
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events[0]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 1, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000}
    result = build_result(events)
    assert result is not None
    assert result["stop_reason"] == "max_tokens"
    assert result["usage"] == {"input_tokens": 7, "output_tokens": 50, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000}


def test_a_json_schema_answer_given_through_the_emulating_tool_streams_as_text(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider
) -> None:
    anthropic_upstream.script(
        anthropic_streamed(
            [
                anthropic_start(),
                *anthropic_block(
                    0,
                    {"type": "tool_use", "id": "toolu_json", "name": "json_response", "input": {}},
                    {"type": "input_json_delta", "partial_json": '{"answer"'},
                    {"type": "input_json_delta", "partial_json": ": 42}"},
                ),
                *anthropic_end("tool_use"),
            ]
        )
    )
    request = {**HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    events, error = run(provider, model(anthropic_upstream), request)
    assert error is None
    result = build_result(events)
    assert result is not None
    assert result["content"] == [{"type": "text", "text": '{"answer": 42}'}]
    assert result["stop_reason"] == "end_turn"
    body = anthropic_upstream.requests[0].body
    assert body["tools"] == [
        {
            "name": "json_response",
            "description": "Give the answer: its input is the whole answer, as JSON matching the schema.",
            "input_schema": {"type": "object"},
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "json_response"}


# --- the request -------------------------------------------------------------------------------

MESSAGES: list[dict[str, Any]] = [
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
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}], "is_error": False},
            {"type": "text", "text": "And now?"},
        ],
    },
]
TOOLS: list[dict[str, Any]] = [
    {"name": "get_weather", "description": "The weather in a city.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
]

FULL_REQUEST: dict[str, Any] = {
    "system": {"prompt": "Be brief."},
    "messages": MESSAGES,
    "tools": TOOLS,
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "thinking": {"type": "enabled", "budget_tokens": 2048},
    "temperature": 1.0,
    "top_k": 40,
    "min_p": 0.05,
    "seed": 7,
    "stop_sequences": ["END"],
    "max_tokens": 3000,
    "correlation_id": "order-42",
    "metadata": {"user_id": "u1"},
}


def test_it_sends_the_request_natively_to_the_messages_endpoint(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed(anthropic_text_stream("Hi")))
    run(provider, model(anthropic_upstream), FULL_REQUEST)
    [received] = anthropic_upstream.requests
    assert received.path == "/v1/messages"
    # min_p and seed are not among what the model supports; metadata stays with the message.
    assert received.body == {
        "model": "claude-served",
        "max_tokens": 3000,
        "messages": MESSAGES,
        "stream": True,
        "system": "Be brief.",
        "temperature": 1.0,
        "top_k": 40,
        "stop_sequences": ["END"],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "tools": TOOLS,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    assert received.headers["x-api-key"] == KEY
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["x-correlation-id"] == "order-42"
    assert "authorization" not in received.headers


def test_it_sends_no_key_header_without_api_key_env(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed(anthropic_text_stream("Hi")))
    run(provider, model(anthropic_upstream, api_key_env=None))
    [received] = anthropic_upstream.requests
    assert "x-api-key" not in received.headers


def test_a_missing_key_variable_fails_without_calling_the_upstream(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    events, error = run(provider, model(anthropic_upstream))
    assert events == []
    assert error is not None and not error.retryable and KEY_ENV in error.message
    assert anthropic_upstream.attempts == 0


def spec_for_body() -> ModelSpec:
    return ModelSpec(id="m", provider="anthropic", max_tokens=10, default_max_tokens=5, supports=frozenset({"temperature", "top_p", "top_k"}))


def test_a_system_prompt_with_citations_goes_as_a_text_block_with_citations() -> None:
    body = messages_body({**HELLO, "system": {"prompt": "Cite.", "citations": {"enabled": True}}}, spec_for_body())
    assert body["system"] == [{"type": "text", "text": "Cite.", "citations": {"enabled": True}}]


def test_a_request_without_max_tokens_gets_the_models_default_and_no_optional_fields() -> None:
    body = messages_body({"messages": HELLO["messages"], "max_tokens": None, "temperature": None, "system": None}, spec_for_body())
    assert body == {"model": "m", "max_tokens": 5, "messages": HELLO["messages"], "stream": True}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "tool_call", "name": "t"}}, {"type": "tool", "name": "t"}),
        ({"response_format": {"type": "tool_call"}}, {"type": "any"}),
        ({"tool_choice": {"type": "none"}}, {"type": "none"}),
        ({"tool_choice": {"type": "tool", "name": "t"}, "response_format": {"type": "tool_call"}}, {"type": "tool", "name": "t"}),
        ({}, None),
    ],
)
def test_tool_call_formats_force_the_tool(fields: dict[str, Any], expected: dict[str, Any] | None) -> None:
    body = messages_body({**HELLO, "tools": [{"name": "t", "input_schema": {"type": "object"}}], **fields}, spec_for_body())
    assert body.get("tool_choice") == expected


def test_with_thinking_enabled_the_json_tool_is_offered_but_not_forced() -> None:
    # The API refuses a forced tool choice together with extended thinking.
    request = {
        **HELLO,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"properties": {"x": {"type": "integer"}}}}},
    }
    body = messages_body(request, spec_for_body())
    assert body["tools"][0]["input_schema"] == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert body["tool_choice"] == {"type": "auto"}


# --- failures before the answer starts -----------------------------------------------------------


def test_a_server_error_is_retried_and_then_the_answer_streams(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps
) -> None:
    anthropic_upstream.script(anthropic_error_reply(500, "Internal server error", error_type="api_error"), anthropic_streamed(anthropic_text_stream("Hello", " there")))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events == [start_event(), *TEXT_EVENTS]
    assert anthropic_upstream.attempts == 2
    assert sleeps == [0.1]


def test_server_errors_are_retried_with_backoff_until_the_attempts_run_out(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps
) -> None:
    anthropic_upstream.script(*(anthropic_error_reply(status, f"failure {status}", error_type="api_error") for status in (500, 502, 503, 504)))
    events, error = run(provider, model(anthropic_upstream))
    assert events == []
    assert error is not None and error.retryable
    assert error.message.endswith("answered 504 (4 attempts): failure 504")
    assert anthropic_upstream.attempts == 4
    assert sleeps == [0.1, 0.2, 0.3]


def test_a_429_waits_as_long_as_retry_after_says(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps) -> None:
    anthropic_upstream.script(
        anthropic_error_reply(429, "Number of request tokens has exceeded your rate limit", error_type="rate_limit_error", headers={"Retry-After": "2"}),
        anthropic_streamed(anthropic_text_stream("Hello", " there")),
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is None and events == [start_event(), *TEXT_EVENTS]
    assert anthropic_upstream.attempts == 2
    assert sleeps == [2.0]


def test_a_529_overload_is_retried(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps) -> None:
    anthropic_upstream.script(anthropic_error_reply(529, "Overloaded", error_type="overloaded_error"), anthropic_streamed(anthropic_text_stream("Hello", " there")))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None and events == [start_event(), *TEXT_EVENTS]
    assert anthropic_upstream.attempts == 2
    assert sleeps == [0.1]


def test_529s_until_the_attempts_run_out_fail_as_a_retryable_overload(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(*(anthropic_error_reply(529, "Overloaded", error_type="overloaded_error") for _ in range(2)))
    events, error = run(provider, model(anthropic_upstream, max_attempts=2))
    assert events == []
    assert error is not None and error.retryable and error.error_type == "overloaded_error"
    assert error.message.endswith("answered 529 (2 attempts): Overloaded")
    assert anthropic_upstream.attempts == 2


def test_a_400_fails_at_once_with_anthropics_message(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps) -> None:
    anthropic_upstream.script(anthropic_error_reply(400, "messages: roles must alternate between \"user\" and \"assistant\""))
    events, error = run(provider, model(anthropic_upstream))
    assert events == []
    assert error is not None and not error.retryable
    assert error.error_type == "invalid_request_error"
    assert error.message.endswith('answered 400: messages: roles must alternate between "user" and "assistant"')
    assert anthropic_upstream.attempts == 1
    assert sleeps == []


def test_an_error_message_that_repeats_the_key_has_it_redacted(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_error_reply(401, f"invalid x-api-key: {KEY}", error_type="authentication_error"))
    _, error = run(provider, model(anthropic_upstream))
    assert error is not None and error.error_type == "authentication_error" and not error.retryable
    assert "invalid x-api-key: [redacted]" in error.message
    assert anthropic_upstream.attempts == 1


def test_a_refused_connection_is_retried_then_fails_as_retryable(provider: AnthropicProvider, sleeps: Sleeps) -> None:
    upstream = AnthropicUpstream()
    upstream.close()  # nothing listens on its port any more
    events, error = run(provider, model(upstream))
    assert events == []
    assert error is not None and error.retryable
    assert error.message.startswith('The connection to the anthropic provider for model "claude-local" failed: ')
    assert error.message.endswith("(4 attempts).") and "127.0.0.1" not in error.message
    assert len(sleeps) == 3


def test_a_failure_names_the_provider_and_model_never_the_upstreams_address(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    at = anthropic_upstream.base_url.split("//")[1]  # 127.0.0.1:<port>
    anthropic_upstream.script(
        anthropic_error_reply(529, f"Overloaded ({at})", error_type="overloaded_error"),
        anthropic_streamed([*CUT_START, {"type": "error", "error": {"type": "invalid_request_error", "message": f"{anthropic_upstream.base_url} says no"}}]),
    )

    _, error = run(provider, model(anthropic_upstream))

    assert error is not None
    assert error.message == 'The anthropic provider for model "claude-local" reported an error in the stream: [model server] says no'
    assert "127.0.0.1" not in caplog.text and at.split(":")[1] not in caplog.text
    assert 'The anthropic provider for model "claude-local" answered 529 (1 attempt): Overloaded ([model server])' in caplog.text


# --- failures in the middle of the answer --------------------------------------------------------

PARTIAL: list[dict[str, Any]] = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_stop", "index": 0},
]
CUT_START: list[Any] = [
    anthropic_start(),
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
]


def restarted(first_attempt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of an attempt cut after `first_attempt`, then a complete second one."""
    return [start_event(), *first_attempt, start_event(), *TEXT_EVENTS]


def test_an_overloaded_error_event_mid_stream_restarts_the_answer_from_scratch(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider, sleeps: Sleeps
) -> None:
    anthropic_upstream.script(
        anthropic_streamed([*CUT_START, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]),
        anthropic_streamed(anthropic_text_stream("Hello", " there")),
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events == restarted(PARTIAL)
    assert types(events).count("message_start") == 2
    assert build_result(events)["content"] == [{"type": "text", "text": "Hello there"}]  # type: ignore[index]
    assert anthropic_upstream.attempts == 2
    assert sleeps == [0.1]


def test_overloaded_error_events_until_the_attempts_run_out_fail_as_retryable(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider
) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    anthropic_upstream.script(anthropic_streamed([*CUT_START, overloaded]), anthropic_streamed([*CUT_START, overloaded]))
    events, error = run(provider, model(anthropic_upstream, max_attempts=2))
    assert error is not None and error.retryable and error.error_type == "overloaded_error"
    assert error.message.endswith("reported an error in the stream: Overloaded, after the model started answering (2 attempts).")
    assert events == [start_event(), *PARTIAL, start_event(), *PARTIAL]


def test_an_invalid_request_error_event_fails_the_message_and_keeps_what_came_before(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider
) -> None:
    anthropic_upstream.script(
        anthropic_streamed([*CUT_START, {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}])
    )
    events, error = run(provider, model(anthropic_upstream))
    assert error is not None and not error.retryable and error.error_type == "invalid_request_error"
    assert error.message.endswith("reported an error in the stream: prompt is too long")
    assert events == [start_event(), *PARTIAL]
    assert anthropic_upstream.attempts == 1


def test_a_connection_reset_mid_stream_restarts_the_answer_from_scratch(
    anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider
) -> None:
    anthropic_upstream.script(anthropic_streamed([*CUT_START, Reset()]), anthropic_streamed(anthropic_text_stream("Hello", " there")))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events == restarted(PARTIAL)
    assert anthropic_upstream.attempts == 2


def test_a_stream_silent_past_the_read_timeout_restarts_the_answer(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(
        anthropic_streamed([*CUT_START, Stall(5)]),
        anthropic_streamed(anthropic_text_stream("Hello", " there")),
    )
    events, error = run(provider, model(anthropic_upstream, read_timeout=0.2))
    assert error is None
    assert events == restarted(PARTIAL)
    assert anthropic_upstream.attempts == 2


def test_a_stream_that_ends_before_its_stop_reason_restarts_the_answer(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed(CUT_START), anthropic_streamed(anthropic_text_stream("Hello", " there")))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events == restarted(PARTIAL)


def test_a_stream_that_lost_only_its_message_stop_still_completes(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed([*anthropic_text_stream("Hello", " there")[:-1], Reset()]))
    events, error = run(provider, model(anthropic_upstream))
    assert error is None
    assert events == [start_event(), *TEXT_EVENTS]
    assert anthropic_upstream.attempts == 1


def test_a_malformed_event_fails_the_message_and_keeps_what_came_before(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed([*CUT_START, Raw(b'event: content_block_delta\ndata: {"type": \n\n')]))
    events, error = run(provider, model(anthropic_upstream))
    assert error is not None and not error.retryable
    assert "malformed event" in error.message
    assert events == [start_event(), *PARTIAL]
    assert anthropic_upstream.attempts == 1


# --- cancellation --------------------------------------------------------------------------------
# The runner cancels the task that iterates a stream (a cancelled message, its time limit) or
# closes the stream. Either way the stream stops at once, even while the upstream is silent, and
# the upstream sees its connection close: the model stops generating.


def test_closing_the_stream_closes_the_upstream_connection_at_once(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    anthropic_upstream.script(anthropic_streamed([*CUT_START, Drip()]))
    stream = provider.stream(HELLO, model(anthropic_upstream), message_id="msg_test")

    events = aio.run(aio.close_when(stream, lambda events: events[-1]["type"] == "content_block_delta"))

    assert types(events)[-1] == "content_block_delta"
    wait_until(lambda: anthropic_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")


def test_a_cancel_while_the_model_is_silent_stops_at_once_and_closes_the_upstream_connection(anthropic_upstream: AnthropicUpstream) -> None:
    anthropic_upstream.script(anthropic_streamed([*CUT_START, Stall(30)]))
    stream = AnthropicProvider().stream(HELLO, model(anthropic_upstream, read_timeout=30), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda events: len(events) == 3))

    assert events == [start_event(), *PARTIAL[:2]]
    assert stopping < 1
    wait_until(lambda: anthropic_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")
    assert anthropic_upstream.attempts == 1


def test_a_cancel_while_waiting_for_the_response_stops_at_once_and_closes_the_upstream_connection(anthropic_upstream: AnthropicUpstream) -> None:
    anthropic_upstream.script(Reply(delay=30, stream=anthropic_text_stream("late")))
    stream = AnthropicProvider().stream(HELLO, model(anthropic_upstream, read_timeout=30), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda _: anthropic_upstream.attempts == 1))

    assert events == [] and stopping < 1
    wait_until(lambda: anthropic_upstream.disconnects == 1, timeout=10, what="the upstream to see its client go away")


def test_a_cancel_during_a_retry_wait_stops_at_once_without_another_attempt(anthropic_upstream: AnthropicUpstream) -> None:
    anthropic_upstream.script(anthropic_error_reply(429, "Slow down", error_type="rate_limit_error", headers={"Retry-After": "20"}))
    waits = aio.CountedSleep()
    stream = AnthropicProvider(sleep=waits).stream(HELLO, model(anthropic_upstream), message_id="msg_test")

    events, stopping = aio.run(aio.cancel_when(stream, lambda _: waits.begun == 1))

    assert events == [] and stopping < 1
    assert anthropic_upstream.attempts == 1


# --- connections ---------------------------------------------------------------------------------


def test_consecutive_messages_share_one_kept_alive_connection(anthropic_upstream: AnthropicUpstream, provider: AnthropicProvider) -> None:
    # The stream ends with message_stop, then the body's end: read, it frees the connection.
    anthropic_upstream.script(anthropic_streamed(anthropic_text_stream("Hello", " there")), anthropic_streamed(anthropic_text_stream("Hello", " there")))

    async def two_messages() -> list[list[dict[str, Any]]]:
        return [await aio.collect(provider.stream(HELLO, model(anthropic_upstream), message_id="msg_test")) for _ in range(2)]

    assert aio.run(two_messages()) == [[start_event(), *TEXT_EVENTS]] * 2
    assert len({received.client_port for received in anthropic_upstream.requests}) == 1


# --- through the runner --------------------------------------------------------------------------


def test_a_message_on_an_anthropic_model_completes_through_the_runner(
    transactional_db: None, anthropic_upstream: AnthropicUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(catalog.models(), "claude-local", model(anthropic_upstream))
    anthropic_upstream.script(
        anthropic_error_reply(529, "Overloaded", error_type="overloaded_error"), anthropic_streamed(anthropic_text_stream("Hello", " there"))
    )
    checked = check_request({"model": "claude-local", "messages": [{"role": "user", "content": "Hi"}], "correlation_id": "c-1"}, endpoint="async")
    assert checked.valid, checked.errors
    jobs.accept("alice", checked)
    job = MessageJob.objects.get(message_id=runner.run_one())
    assert job.status == Status.COMPLETED
    assert job.result["id"] == job.message_id and job.result["model"] == "claude-local"
    assert job.result["content"] == [{"type": "text", "text": "Hello there"}]
    assert job.result["usage"] == {"input_tokens": 10, "output_tokens": 3}
    assert anthropic_upstream.attempts == 2
    assert anthropic_upstream.requests[1].body["max_tokens"] == 256
    assert anthropic_upstream.requests[1].headers["x-correlation-id"] == "c-1"
