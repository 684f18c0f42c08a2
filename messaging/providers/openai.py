"""The `openai` provider: any server that speaks OpenAI's Chat Completions API with streaming
(OpenAI itself, vLLM, llama.cpp's server, SGLang, LiteLLM, Ollama's /v1...).

It translates our request into a Chat Completions body and the chunks that come back into
Anthropic-shaped events; the calling, the retries, the restarts of a cut stream, the scrubbing
of keys and addresses and the cancellation are shared with the `anthropic` provider (http.py).

A model's `options`: `base_url` (the API root, e.g. "http://127.0.0.1:8000/v1"),
`upstream_model`, `api_key_env` (the NAME of the environment variable holding the key, read at
call time; without it no Authorization header is sent), `connect_timeout` (10 s),
`read_timeout` (60 s of silence), `max_attempts` (4), `retry_deadline` (120 s),
`retry_base_delay` / `retry_max_delay` (backoff, see retry.py), `max_connections` (to this
upstream, per process; unbounded by default), `max_tokens_field` ("max_tokens"; newer OpenAI
models want "max_completion_tokens").

Failures are http.py's, with what is particular to Chat Completions: the stream's end marker is
`data: [DONE]`, and a cut is a stream ending before a `finish_reason`. A malformed chunk, or an
error object in the stream, fails the message with what was produced kept; an in-stream error
that says it is a server error or overload is cut-like and restarts the answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from httpx_sse import ServerSentEvent

from .base import SAMPLING_FIELDS, ModelSpec, ProviderError, message_start
from .http import Answer, HTTPProvider, StreamCut, Upstream, capitalized, message_in
from .retry import RETRYABLE_STATUSES

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class OpenAIProvider(HTTPProvider):
    path = "/chat/completions"

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, request: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
        return chat_completions_body(request, spec)

    def answer(self, request: Mapping[str, Any], spec: ModelSpec, message_id: str) -> Answer:
        return _Translation(request, spec, message_id)


# --- the request -----------------------------------------------------------------------------


def chat_completions_body(request: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Our request as a streaming Chat Completions request body."""
    options = spec.options
    body: dict[str, Any] = {
        "model": options.get("upstream_model") or spec.id,
        "messages": _messages(request),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body[options.get("max_tokens_field", "max_tokens")] = request.get("max_tokens") or spec.default_max_tokens
    # Only the sampling fields the model honours: the others drew a warning saying they are
    # ignored, and OpenAI itself answers 400 to fields it does not know (top_k, min_p...).
    for name in SAMPLING_FIELDS:
        if request.get(name) is not None and name in spec.supports:
            body[name] = request[name]
    if request.get("stop_sequences"):
        body["stop"] = list(request["stop_sequences"])

    tools = request.get("tools") or []
    if tools:
        body["tools"] = [_tool(tool) for tool in tools]
    tool_choice = _tool_choice(request)
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if tools and (request.get("tool_choice") or {}).get("disable_parallel_tool_use"):
        body["parallel_tool_calls"] = False

    response_format = request.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        json_schema = response_format.get("json_schema") or {}
        upstream_format: dict[str, Any] = {"name": json_schema.get("name") or "response", "schema": json_schema.get("schema") or {}}
        if json_schema.get("strict") is not None:
            upstream_format["strict"] = json_schema["strict"]
        body["response_format"] = {"type": "json_schema", "json_schema": upstream_format}
    return body


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object"}
    return {"type": "function", "function": function}


def _tool_choice(request: Mapping[str, Any]) -> Any:
    if not request.get("tools"):
        return None
    choice = request.get("tool_choice") or {}
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    response_format = request.get("response_format") or {}
    if response_format.get("type") == "tool_call":
        # Like a forced tool: the named one, or any of them.
        name = response_format.get("name")
        return {"type": "function", "function": {"name": name}} if name else "required"
    if kind == "auto":
        return "auto"
    return None


def _messages(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    prompt = system.get("prompt") if isinstance(system, Mapping) else system
    if prompt:
        messages.append({"role": "system", "content": prompt})
    for message in request.get("messages") or ():
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or ())
        if message.get("role") == "assistant":
            messages.extend(_assistant_message(blocks))
        else:
            messages.extend(_user_messages(blocks))
    return messages


def _assistant_message(blocks: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Thinking is dropped: Chat Completions has no way to send it back, and its signature
    # would mean nothing to another model.
    texts = [block.get("text") or "" for block in blocks if block.get("type") == "text"]
    calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)},
        }
        for block in blocks
        if block.get("type") == "tool_use"
    ]
    if not texts and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _user_messages(blocks: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool results first, as `tool` messages right after the assistant's calls (where Chat
    Completions requires them), then the rest of the user's content as one user message."""
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "tool_result":
            text, images = _tool_result_content(block)
            messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            # A tool message carries text only; its images go to the user message that follows.
            parts.extend(images)
    if len(parts) == 1 and parts[0]["type"] == "text":
        messages.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        messages.append({"role": "user", "content": parts})
    return messages


def _tool_result_content(block: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    content = block.get("content")
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        text = content
    else:
        texts = []
        for inner in content or ():
            if inner.get("type") == "text":
                texts.append(inner.get("text") or "")
            elif inner.get("type") == "image":
                images.append(_image_part(inner))
        text = "\n".join(texts)
    if block.get("is_error"):
        text = f"Error: {text}"
    return text, images


def _image_part(block: Mapping[str, Any]) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    else:
        url = source.get("url") or ""
    return {"type": "image_url", "image_url": {"url": url}}


# --- the response ----------------------------------------------------------------------------


def _parse_chunk(data: str, upstream: Upstream) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ProviderError(f"{capitalized(upstream.name)} sent a malformed chunk (not JSON).") from None
    if not isinstance(chunk, dict):
        raise ProviderError(f"{capitalized(upstream.name)} sent a malformed chunk (not an object).")
    error = chunk.get("error")
    if error:
        message = upstream.scrub(message_in(chunk))
        code = error.get("code") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        if code in RETRYABLE_STATUSES or kind in ("server_error", "overloaded_error"):
            raise StreamCut(f"{capitalized(upstream.name)} reported an error in the stream: {message}")
        raise ProviderError(f"{capitalized(upstream.name)} reported an error in the stream: {message}")
    return chunk


class _Translation:
    """One attempt's Chat Completions chunks as Anthropic-shaped events."""

    def __init__(self, request: Mapping[str, Any], spec: ModelSpec, message_id: str):
        self.spec = spec
        self.message_id = message_id
        self.stop_sequences = list(request.get("stop_sequences") or ())
        self.index = -1
        self.open: str | None = None  # "text", "thinking" or "tool"
        self.tool_blocks: dict[int, int] = {}  # the upstream's tool call index -> our block index
        self.unnamed_tools: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.matched_stop: Any = None
        self.refused = False
        self.usage: dict[str, Any] = {}
        self.deltas = 0

    # `Answer`: message_start goes out as soon as an attempt reads a stream.
    started = True
    ended = False

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None

    def begin(self) -> list[dict[str, Any]]:
        return [self.start()]

    def feed(self, sse: ServerSentEvent, upstream: Upstream) -> list[dict[str, Any]]:
        if sse.data == "[DONE]":
            self.ended = True
            return []
        if sse.data and sse.event in ("", "message"):
            return self.chunk(_parse_chunk(sse.data, upstream))
        return []

    def start(self) -> dict[str, Any]:
        return message_start(self.message_id, self.spec.id)

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return self._chunk(chunk)
        except (AttributeError, TypeError, KeyError):
            raise ProviderError("The model server sent a malformed chunk.") from None

    def _chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # we never ask for n > 1
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                events += self._text("thinking", reasoning)
            if delta.get("content"):
                events += self._text("text", delta["content"])
            if delta.get("refusal"):
                self.refused = True
                events += self._text("text", delta["refusal"])
            for call in delta.get("tool_calls") or ():
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                # vLLM says which stop string ended the answer.
                self.matched_stop = choice.get("stop_reason")
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        events = [] if self.open == kind else self._open(kind, {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""})
        self.deltas += 1
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        events.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        position = call.get("index", 0)
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if position in self.tool_blocks:
            if self.tool_blocks[position] != self.index or self.open != "tool":
                raise ProviderError("The model server interleaved the arguments of two tool calls.")
            if not arguments:
                return []
            self.deltas += 1
            return [{"type": "content_block_delta", "index": self.index, "delta": {"type": "input_json_delta", "partial_json": arguments}}]
        # A call opens as a block once its name is known; servers send it in the first piece,
        # but nothing in the format promises that.
        pending = self.unnamed_tools.setdefault(position, {"id": "", "name": "", "arguments": ""})
        pending["id"] = pending["id"] or call.get("id") or ""
        pending["name"] += function.get("name") or ""
        pending["arguments"] += arguments
        if not pending["name"]:
            return []
        return self._open_tool(position)

    def _open_tool(self, position: int) -> list[dict[str, Any]]:
        pending = self.unnamed_tools.pop(position)
        tool_id = pending["id"] or "call_" + hashlib.sha256(f"{self.message_id}:{self.index + 1}".encode()).hexdigest()[:24]
        events = self._open("tool", {"type": "tool_use", "id": tool_id, "name": pending["name"], "input": {}})
        self.tool_blocks[position] = self.index
        if pending["arguments"]:
            self.deltas += 1
            events.append({"type": "content_block_delta", "index": self.index, "delta": {"type": "input_json_delta", "partial_json": pending["arguments"]}})
        return events

    def _open(self, kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.index += 1
        self.open = kind
        events.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return events

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def finish(self) -> list[dict[str, Any]]:
        if self.finish_reason is None:
            raise StreamCut("the stream ended before the model finished")
        if self.unnamed_tools:
            raise ProviderError("The model server sent a tool call without a name.")
        events = self._close()
        stop_reason = _STOP_REASONS.get(self.finish_reason, "end_turn")
        stop_sequence = None
        if stop_reason == "end_turn":
            if self.tool_blocks:
                # A forced tool ends with "stop" rather than "tool_calls" on OpenAI.
                stop_reason = "tool_use"
            elif self.refused:
                stop_reason = "refusal"
            elif isinstance(self.matched_stop, str) and self.matched_stop in self.stop_sequences:
                stop_reason, stop_sequence = "stop_sequence", self.matched_stop
        usage: dict[str, Any] = {}
        if isinstance(self.usage.get("prompt_tokens"), int):
            usage["input_tokens"] = self.usage["prompt_tokens"]
        completion = self.usage.get("completion_tokens")
        # Without usage, one token per delta: what OpenAI and vLLM send when they stream.
        usage["output_tokens"] = completion if isinstance(completion, int) else self.deltas
        events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage})
        events.append({"type": "message_stop"})
        return events

    def abandon(self) -> list[dict[str, Any]]:
        """Close the open block of an attempt that ends here."""
        self.unnamed_tools.clear()
        return self._close()
