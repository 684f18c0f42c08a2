"""The `anthropic` provider: Anthropic's Messages API with streaming (api.anthropic.com, or
any server that speaks it: a gateway, a proxy, a compatible local server).

Like the `openai` provider it talks plain HTTP rather than through the vendor's SDK, with the
machinery both share (http.py): pooled connections, the attempts and their retries, the
restarts of a cut stream, key and address scrubbing, cancellation.

A model's `options`: `base_url` (the API root, default "https://api.anthropic.com"; requests
go to {base_url}/v1/messages), `upstream_model`, `api_key_env` (the NAME of the environment
variable holding the key, sent as `x-api-key`; without it no key header is sent),
`connect_timeout`, `read_timeout`, `max_attempts`, `retry_deadline`, `retry_base_delay`,
`retry_max_delay`, `max_connections`, as for `openai`.

The request: our normalized request is already Anthropic's shape, so it goes nearly as it is:
messages (text, image, tool_use, tool_result, thinking with its signature), tools,
tool_choice, thinking, stop_sequences, the sampling fields the model `supports`. The system
prompt goes as a string, or, when `system.citations.enabled` is set, as one text block with
`citations: {enabled: true}` (the Messages API accepts `citations` on text blocks; whether it
honours it on a system block depends on the model, and a 400 would say so). `metadata` is not
sent: the contract says it is kept with the message only. `mcp_servers` never reach a
provider: the service itself is the MCP client (messaging/toolloop.py), and this provider sees
their tools as plain `tools`, their calls and results as `tool_use` and `tool_result` blocks.

`response_format: {type: "json_schema"}` has no native field in API version 2023-06-01. It is
emulated with a forced tool: a tool named `json_response` whose input schema is the requested
schema, chosen by `tool_choice`, and whose input streams back to the client as a TEXT block
(its `input_json_delta` fragments as `text_delta`s) ending with `end_turn`, so the answer looks
the same as from a model with native JSON output. With thinking enabled a forced tool choice is
refused by the API, so the tool is offered with `tool_choice: auto` instead (best effort).
`response_format: {type: "tool_call"}` forces the named tool, or any tool.

The events: Anthropic's own, passed through with the same shapes, except that `message_start`
carries OUR message id and model id; `ping` is dropped. Failures are as in http.py: before
the answer, connection errors, timeouts, 429 (honouring Retry-After), 500/502/503/504 and 529
are retried within `max_attempts` and `retry_deadline`, any other status fails at once with
Anthropic's `error.message`. A stream cut in the middle (a reset, `read_timeout` of silence,
the stream ending before `message_stop`, an `event: error` of type overloaded_error or
api_error) restarts FROM SCRATCH with a new `message_start` within the same budget; any other
in-stream error fails the message with what was produced kept, its open block closed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from httpx_sse import ServerSentEvent

from .base import SAMPLING_FIELDS, ModelSpec, ProviderError
from .http import Answer, HTTPProvider, StreamCut, Upstream, capitalized

DEFAULT_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
JSON_TOOL = "json_response"
# In-stream errors that another attempt may fix; the others are the request's own fault.
_RESTARTING_ERRORS = frozenset({"overloaded_error", "api_error"})
_KNOWN_ERROR_TYPES = frozenset(
    {
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "billing_error", "timeout_error",
    }
)


class AnthropicProvider(HTTPProvider):
    path = "/v1/messages"
    default_base_url = DEFAULT_BASE_URL

    def headers(self, key: str | None) -> dict[str, str]:
        return {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": key} if key else {})}

    def body(self, request: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
        return messages_body(request, spec)

    def answer(self, request: Mapping[str, Any], spec: ModelSpec, message_id: str) -> Answer:
        return _Relay(spec, message_id, _emulates_json(request))


# --- the request -----------------------------------------------------------------------------


def messages_body(request: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Our request as a streaming Messages API request body."""
    body: dict[str, Any] = {
        "model": spec.options.get("upstream_model") or spec.id,
        "max_tokens": request.get("max_tokens") or spec.default_max_tokens,
        "messages": [{"role": message["role"], "content": message["content"]} for message in request.get("messages") or ()],
        "stream": True,
    }
    system = request.get("system")
    prompt = system.get("prompt") if isinstance(system, Mapping) else system
    if prompt:
        citations = system.get("citations") if isinstance(system, Mapping) else None
        if citations and citations.get("enabled"):
            body["system"] = [{"type": "text", "text": prompt, "citations": {"enabled": True}}]
        else:
            body["system"] = prompt
    # Only the sampling fields the model honours: the others drew a warning saying they are
    # ignored, and the API answers 400 to fields it does not know (min_p, seed...).
    for name in SAMPLING_FIELDS:
        if request.get(name) is not None and name in spec.supports:
            body[name] = request[name]
    if request.get("stop_sequences"):
        body["stop_sequences"] = list(request["stop_sequences"])
    thinking = request.get("thinking")
    if thinking:
        body["thinking"] = dict(thinking)

    tools = [dict(tool) for tool in request.get("tools") or ()]
    tool_choice = dict(request["tool_choice"]) if request.get("tool_choice") else None
    response_format = request.get("response_format") or {}
    if response_format.get("type") == "tool_call" and tools and (tool_choice is None or tool_choice.get("type") == "auto"):
        name = response_format.get("name")
        forced: dict[str, Any] = {"type": "tool", "name": name} if name else {"type": "any"}
        if tool_choice and "disable_parallel_tool_use" in tool_choice:
            forced["disable_parallel_tool_use"] = tool_choice["disable_parallel_tool_use"]
        tool_choice = forced
    json_schema = _emulates_json(request)
    if json_schema is not None:
        tools.append(
            {
                "name": JSON_TOOL,
                "description": "Give the answer: its input is the whole answer, as JSON matching the schema.",
                "input_schema": json_schema,
            }
        )
        thinking_on = bool(thinking) and thinking.get("type") == "enabled"
        tool_choice = {"type": "auto"} if thinking_on else {"type": "tool", "name": JSON_TOOL}
    if tools:
        body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
    elif tool_choice is not None and tool_choice.get("type") == "none":
        body["tool_choice"] = tool_choice
    return body


def _emulates_json(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The schema of a json_schema response format, emulated with a forced tool; else None."""
    response_format = request.get("response_format") or {}
    if response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    # A tool's input is an object; a schema that names no type is taken as one (any other
    # type draws the API's own 400, which names the problem).
    return {"type": "object", **schema}


# --- the response ----------------------------------------------------------------------------


def _parse_event(data: str, upstream: Upstream) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise ProviderError(f"{capitalized(upstream.name)} sent a malformed event (not JSON).") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProviderError(f"{capitalized(upstream.name)} sent a malformed event (not an object with a type).")
    if event["type"] == "error":
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
        message = upstream.scrub(str(error.get("message") or kind))
        text = f"{capitalized(upstream.name)} reported an error in the stream: {message}"
        if kind in _RESTARTING_ERRORS:
            raise StreamCut(text, error_type=kind)
        raise ProviderError(text, error_type=kind if kind in _KNOWN_ERROR_TYPES else "api_error")
    return event


class _Relay:
    """One attempt's upstream events, passed on with our ids, and what they have said so far."""

    def __init__(self, spec: ModelSpec, message_id: str, json_tool: dict[str, Any] | None):
        self.spec = spec
        self.message_id = message_id
        self.emulating_json = json_tool is not None
        self.started = False
        self.open: int | None = None  # the index of the open content block
        self.json_blocks: set[int] = set()
        self.stop_reason: str | None = None
        self.stopped = False

    # `Answer` (the attempts in http.py)
    @property
    def ended(self) -> bool:
        return self.stopped

    @property
    def complete(self) -> bool:
        return self.stop_reason is not None

    def begin(self) -> list[dict[str, Any]]:
        return []  # the upstream sends its own message_start

    def feed(self, sse: ServerSentEvent, upstream: Upstream) -> list[dict[str, Any]]:
        if sse.event == "ping" or not sse.data:
            return []
        return self.event(_parse_event(sse.data, upstream))

    def event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return self._event(event)
        except (AttributeError, TypeError, KeyError):
            raise ProviderError("The model server sent a malformed event.") from None

    def _event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind == "message_start":
            if self.started:
                raise ProviderError("The model server started a second message in one stream.")
            self.started = True
            message = dict(event["message"])
            message.update(id=self.message_id, model=self.spec.id, content=[])
            return [{"type": "message_start", "message": message}]
        if not self.started:
            raise ProviderError(f"The model server sent {kind} before message_start.")
        if kind == "content_block_start":
            block = event["content_block"]
            self.open = event["index"]
            if self.emulating_json and block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
                self.json_blocks.add(event["index"])
                return [{"type": "content_block_start", "index": event["index"], "content_block": {"type": "text", "text": ""}}]
            return [event]
        if kind == "content_block_delta":
            delta = event["delta"]
            if event["index"] in self.json_blocks:
                if delta.get("type") != "input_json_delta" or not delta.get("partial_json"):
                    return []
                return [{"type": "content_block_delta", "index": event["index"], "delta": {"type": "text_delta", "text": delta["partial_json"]}}]
            return [event]
        if kind == "content_block_stop":
            self.open = None
            return [event]
        if kind == "message_delta":
            delta = dict(event.get("delta") or {})
            if delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
                if self.json_blocks and delta["stop_reason"] == "tool_use":
                    delta["stop_reason"] = "end_turn"
            return [{**event, "delta": delta}]
        if kind == "message_stop":
            self.stopped = True
            return [{"type": "message_stop"}]
        return []  # event types newer than this module: nothing a client of ours could read

    def finish(self) -> list[dict[str, Any]]:
        """The end of a stream: nothing more after `message_stop`; without it, close the answer."""
        if self.stopped:
            return []
        if self.stop_reason is None:
            raise StreamCut("the stream ended before the model finished")
        events = self.abandon()
        self.stopped = True
        return [*events, {"type": "message_stop"}]

    def abandon(self) -> list[dict[str, Any]]:
        """Close the open block of an attempt that ends here."""
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [{"type": "content_block_stop", "index": index}]
