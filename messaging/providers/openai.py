"""The `openai` provider: any server that speaks OpenAI's Chat Completions API with streaming
(OpenAI itself, vLLM, llama.cpp's server, SGLang, LiteLLM, Ollama's /v1...).

It talks plain HTTP through httpx and reads the event stream with httpx-sse, rather than
through the `openai` SDK: the SDK retries on its own schedule (which would hide attempts from
our shared policy in retry.py), validates responses against OpenAI's own models, and brings
pydantic along, while the wire format is small and stable and the servers we aim at add fields
(`reasoning_content`, `stop_reason`, `top_k`) that are easiest to handle as plain JSON.

A model's `options`: `base_url` (the API root, e.g. "http://127.0.0.1:8000/v1"),
`upstream_model`, `api_key_env` (the NAME of the environment variable holding the key, read at
call time; without it no Authorization header is sent), `connect_timeout` (10 s),
`read_timeout` (60 s of silence), `max_attempts` (4), `retry_deadline` (120 s),
`retry_base_delay` / `retry_max_delay` (backoff, see retry.py), `max_tokens_field`
("max_tokens"; newer OpenAI models want "max_completion_tokens").

Failures:
- Before the model starts answering (connection refused, a timeout before the response, 429,
  500/502/503/504, 529) the request is retried as retry.py says; any other status fails at
  once, not retryable, with the server's own error message.
- A stream cut in the middle (a connection reset, `read_timeout` of silence, the stream
  ending before a `finish_reason`) is retried FROM SCRATCH within the same attempts and
  deadline: the open content block is closed and a new `message_start` follows, which the
  rest of the service already reads as "start over" (events.MessageBuilder, and Anthropic's
  SDKs reset their message there). The alternative, failing with the partial answer, would
  turn every proxy hiccup during a long answer into a failed message; the cost of a restart
  is the tokens already generated, bounded by `max_attempts`. The abandoned attempt gets no
  `message_delta` or `message_stop`, so no client takes it for the answer.
- A malformed chunk, or an error object in the stream, fails the message (`failed`) with
  what was produced kept: a server that sends garbage is not likely to stop on a retry. An
  in-stream error that says it is a server error or overload is cut-like and restarts.
- When every attempt is used, or the next wait would end past the deadline, the message
  fails with a retryable ProviderError that says how many attempts were made.

The key never appears in an event, an error, a log line or an exception's message: every text
that leaves this module from the upstream is scrubbed of it.

Cancellation: when the worker closes this generator, the `with` around the upstream response
closes the connection at once, so the server stops generating. When `cancelled` is set (from
the worker's watch thread) the call stops even while nothing arrives: a retry's wait is cut
short, and the connection is shut down under the thread blocked reading it (`_Connection`).
Only a connection still being established is waited out (at most `connect_timeout`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
from httpx_sse import EventSource, ServerSentEvent

from messaging import catalog
from messaging.headers import header_value

from .base import ModelSpec, Provider, ProviderError
from .retry import RETRYABLE_STATUSES, Attempts, RetryPolicy, retry_after_seconds

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
# Enough for any error message; a server that answers an error with megabytes gets cut short.
_MAX_ERROR_BODY = 64 * 1024
_MAX_ERROR_MESSAGE = 1000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class OpenAIProvider(Provider):
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Event, float], object] = threading.Event.wait,
        rand: Callable[[], float] = random.random,
    ) -> None:
        # `wait(cancelled, seconds)` is how a retry waits: cut short by a cancellation.
        self._clock = clock
        self._wait = wait
        self._rand = rand
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_pid: int | None = None

    def stream(
        self, request: dict, spec: ModelSpec, *, message_id: str, cancelled: threading.Event | None = None
    ) -> Iterator[dict]:
        if cancelled is None:
            cancelled = threading.Event()
        connection = _Connection(cancelled)
        try:
            yield from self._stream(request, spec, message_id, cancelled, connection)
        finally:
            connection.stop()

    def _stream(
        self, request: dict, spec: ModelSpec, message_id: str, cancelled: threading.Event, connection: _Connection
    ) -> Iterator[dict]:
        options = spec.options
        key = _api_key(spec)
        upstream = _Upstream(options.get("base_url") or "", key, spec)
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if request.get("correlation_id"):
            headers["X-Correlation-ID"] = header_value(request["correlation_id"])
        body = orjson.dumps(chat_completions_body(request, spec))
        timeout = _timeout(options)
        attempts = Attempts(
            RetryPolicy.from_options(options),
            clock=self._clock,
            sleep=lambda seconds: self._wait(cancelled, seconds),
            rand=self._rand,
        )
        client = self._http()
        extensions = {"trace": connection.trace}

        yield from _stream_with_retries(
            client=client, upstream=upstream, body=body, headers=headers, timeout=timeout, extensions=extensions,
            attempts=attempts, cancelled=cancelled, message_id=message_id,
            new_answer=lambda: _Translation(request, spec, message_id),
        )

    def _http(self) -> httpx.Client:
        # One client per process (a forked worker must not share its parent's sockets), and no
        # kept-alive connections: every request opens its own, so that `_Connection` sees the
        # socket it must shut down to interrupt a silent wait. A connection per message costs
        # a handshake, small next to a model's answer.
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = httpx.Client(follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=0))
                self._client_pid = os.getpid()
            return self._client


class _Connection:
    """Interrupts the upstream call the moment `cancelled` is set.

    A thread blocked reading a socket (a model silent for a while, a server slow to answer,
    a retry's wait aside) only wakes when the socket is shut down; closing it is not enough.
    So httpcore's trace hook hands us each socket the call opens, and a small thread shuts
    them down when `cancelled` is set. The reader then sees the connection end and stops.
    """

    _OPENED = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")
    _POLL = 0.1

    def __init__(self, cancelled: threading.Event):
        self.cancelled = cancelled
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if not name.endswith(self._OPENED) or info.get("return_value") is None:
            return
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="openai-cancel", daemon=True)
                self._thread.start()
        if self.cancelled.is_set():
            self._shut_down()

    def _watch(self) -> None:
        # Polls for its end: an Event cannot wait on two events, and the caller owns `cancelled`.
        while not self._finished.is_set():
            if self.cancelled.wait(self._POLL):
                self._shut_down()
                return

    def _shut_down(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                # The plain socket method: SSLSocket's own would drop its SSL object under the
                # reading thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def stop(self) -> None:
        self._finished.set()


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
    for name in catalog.SAMPLING_FIELDS:
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


def _api_key(spec: ModelSpec) -> str | None:
    key = catalog.api_key(spec)
    if spec.options.get("api_key_env") and not key:
        name = spec.options["api_key_env"]
        raise ProviderError(f"The environment variable {name} that should hold the API key is not set.", error_type="authentication_error")
    return key or None


# --- the response ----------------------------------------------------------------------------


class _StreamCut(Exception):
    """The stream broke in a way a new attempt may fix."""

    def __init__(self, message: str, error_type: str = "api_error"):
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class _Upstream:
    def __init__(self, base_url: str, key: str | None, spec: ModelSpec):
        self.url = base_url.rstrip("/") + "/chat/completions"
        # Messages name the provider and the model, never where it is: a failure is stored,
        # streamed to clients and logged, and the base URL is the operator's (an internal host,
        # a port, credentials of its own).
        self.name = f'the {spec.provider} provider for model "{spec.id}"'
        self.key = key
        self._places = _places(base_url)

    def scrub(self, text: str) -> str:
        """Upstream text without our key or the upstream's address (its own messages repeat it)."""
        if self.key:
            text = text.replace(self.key, "[redacted]")
        for place in self._places:
            text = text.replace(place, "[model server]")
        return text

    def status_error(self, response: httpx.Response, attempt: int) -> ProviderError:
        status = response.status_code
        detail = self.scrub(_error_message(response))
        retryable = status in RETRYABLE_STATUSES
        where = f" ({attempt} {'attempt' if attempt == 1 else 'attempts'})" if retryable else ""
        message = f"{_capitalized(self.name)} answered {status}{where}: {detail}" if detail else f"{_capitalized(self.name)} answered {status}{where}."
        error_type = _ERROR_TYPES.get(status, "api_error")
        return ProviderError(message, error_type=error_type, retryable=retryable)


def _places(url: str) -> list[str]:
    """The ways text may name the upstream: its URL, host and port, host; longest first."""
    try:
        parts = urlsplit(url)
        places = [url.rstrip("/"), f"{parts.scheme}://{parts.netloc}", parts.netloc, parts.hostname or ""]
    except ValueError:
        places = [url]
    return sorted({place for place in places if len(place) > 3}, key=len, reverse=True)


def _error_message(response: httpx.Response) -> str:
    raw = b""
    for piece in response.iter_bytes():
        raw += piece
        if len(raw) >= _MAX_ERROR_BODY:
            break
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:_MAX_ERROR_MESSAGE]
    return _message_in(data)[:_MAX_ERROR_MESSAGE]


def _message_in(data: Any) -> str:
    # OpenAI: {"error": {"message"}}; vLLM: {"object": "error", "message"}; some proxies:
    # {"error": "text"} or {"detail": ...}.
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for name in ("message", "detail"):
            if data.get(name):
                return data[name] if isinstance(data[name], str) else json.dumps(data[name])
    return json.dumps(data)[:_MAX_ERROR_MESSAGE]


def _retry_after(response: httpx.Response) -> float | None:
    milliseconds = response.headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    return retry_after_seconds(response.headers.get("retry-after"))


def _parse_chunk(data: str, upstream: _Upstream) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ProviderError(f"{_capitalized(upstream.name)} sent a malformed chunk (not JSON).") from None
    if not isinstance(chunk, dict):
        raise ProviderError(f"{_capitalized(upstream.name)} sent a malformed chunk (not an object).")
    error = chunk.get("error")
    if error:
        message = upstream.scrub(_message_in(chunk))
        code = error.get("code") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        if code in RETRYABLE_STATUSES or kind in ("server_error", "overloaded_error"):
            raise _StreamCut(f"{_capitalized(upstream.name)} reported an error in the stream: {message}")
        raise ProviderError(f"{_capitalized(upstream.name)} reported an error in the stream: {message}")
    return chunk


def _timeout(options: Mapping[str, Any]) -> httpx.Timeout:
    return httpx.Timeout(
        connect=float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
        read=float(options.get("read_timeout", DEFAULT_READ_TIMEOUT)),
        write=float(options.get("read_timeout", DEFAULT_READ_TIMEOUT)),
        pool=float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
    )


class _Answer(Protocol):
    """How one attempt reads a provider's event stream (`_Translation`, anthropic's `_Relay`)."""

    started: bool  # it has sent message_start: a failure from here on restarts the answer
    ended: bool  # the stream's own end marker has been read

    @property
    def complete(self) -> bool: ...  # the model said why it stopped: only the tail can be lost

    def begin(self) -> list[dict[str, Any]]: ...
    def feed(self, sse: ServerSentEvent, upstream: _Upstream) -> list[dict[str, Any]]: ...
    def finish(self) -> list[dict[str, Any]]: ...
    def abandon(self) -> list[dict[str, Any]]: ...


def _stream_with_retries(
    *,
    client: httpx.Client,
    upstream: _Upstream,
    body: bytes,
    headers: dict[str, str],
    timeout: httpx.Timeout,
    extensions: dict[str, Any],
    attempts: Attempts,
    cancelled: threading.Event,
    message_id: str,
    new_answer: Callable[[], _Answer],
) -> Iterator[dict]:
    """Both real providers' attempts: call, read the event stream through a fresh `_Answer`,
    and on a failure another attempt may fix, wait and start over (see the module docstring)."""
    while not cancelled.is_set():
        attempt = attempts.start()
        answer: _Answer | None = None
        retry_after: float | None = None
        try:
            with client.stream("POST", upstream.url, content=body, headers=headers, timeout=timeout, extensions=extensions) as response:
                if response.status_code != 200:
                    error = upstream.status_error(response, attempt)
                    retry_after = _retry_after(response)
                    raise error
                content_type = response.headers.get("content-type", "").partition(";")[0].strip()
                if content_type != "text/event-stream":
                    raise ProviderError(f"{_capitalized(upstream.name)} answered with {content_type or 'no content type'} instead of an event stream.")
                answer = new_answer()
                yield from answer.begin()
                for sse in EventSource(response).iter_sse():
                    yield from answer.feed(sse, upstream)
                    if answer.ended:
                        break
                yield from answer.finish()
                return
        except ProviderError as error:
            if cancelled.is_set():
                return
            if answer is None and error.retryable:
                # An error status: the response is closed before the wait.
                if attempts.wait_before_retry(retry_after):
                    logger.warning("message %s: %s; trying again", message_id, error.message)
                    continue
                raise
            # A malformed or failed stream: keep what was produced, with its blocks closed.
            if answer is not None:
                yield from answer.abandon()
            raise
        except _StreamCut as cut:
            problem, error_type = upstream.scrub(cut.message), cut.error_type
        except httpx.TimeoutException as exc:
            problem, error_type = f"{upstream.name} did not answer within its timeout ({type(exc).__name__})", "timeout_error"
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            # The exception's text quotes the URL.
            raise ProviderError(f"Cannot call {upstream.name}: its base_url cannot be used ({type(exc).__name__}).") from None
        except httpx.RequestError as exc:
            problem = f"the connection to {upstream.name} failed: {upstream.scrub(str(exc)) or type(exc).__name__}"
            error_type = "api_error"
        except Exception:
            if cancelled.is_set():
                return  # whatever a connection shut down under its reader raised
            raise

        # A failure that another attempt may fix.
        if cancelled.is_set():
            return
        if answer is not None and answer.complete:
            # The answer was complete: only its usage or the end marker were lost.
            yield from answer.finish()
            return
        if answer is not None and answer.started:
            yield from answer.abandon()
            problem = f"{problem}, after the model started answering"
        if not attempts.wait_before_retry():
            plural = "attempt" if attempt == 1 else "attempts"
            raise ProviderError(f"{_capitalized(problem)} ({attempt} {plural}).", error_type=error_type, retryable=True)
        logger.warning("message %s: %s (attempt %s); trying again", message_id, problem, attempt)


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

    # `_Answer`: message_start goes out as soon as an attempt reads a stream.
    started = True
    ended = False

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None

    def begin(self) -> list[dict[str, Any]]:
        return [self.start()]

    def feed(self, sse: ServerSentEvent, upstream: _Upstream) -> list[dict[str, Any]]:
        if sse.data == "[DONE]":
            self.ended = True
            return []
        if sse.data and sse.event in ("", "message"):
            return self.chunk(_parse_chunk(sse.data, upstream))
        return []

    def start(self) -> dict[str, Any]:
        return {
            "type": "message_start",
            "message": {
                "id": self.message_id,
                "type": "message",
                "role": "assistant",
                "model": self.spec.id,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        }

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
            raise _StreamCut("the stream ended before the model finished")
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


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
