"""Local servers that speak real model APIs over real HTTP, scripted per test.

`OpenAIUpstream` answers POST {base_url}/chat/completions the way OpenAI documents its
streaming Chat Completions: `Content-Type: text/event-stream`, chunked transfer encoding, one
`data: {json}` event per `chat.completion.chunk` (each with `usage: null` when
`stream_options.include_usage` is set), a last chunk with `choices: []` and the usage, then
`data: [DONE]`. Errors are JSON bodies `{"error": {"message", "type", "param", "code"}}`.

A test scripts the replies, one per request in order (`upstream.script(reply, reply...)`), and
reads back what each request carried (`upstream.requests`, with the client's port: requests
from one port came over one kept-alive connection) and how many were answered at once at the
most (`upstream.peak_in_flight`). A streamed reply is a list of items: a dict is a chunk,
"[DONE]" the end marker, and the actions below misbehave on purpose (stall, reset the
connection, send raw bytes, or keep sending comments). A client that goes away while its
reply stalls or drips is counted in `upstream.disconnects`: that is how a test sees that a
cancelled client stopped the generation.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

CHUNK_ID = "chatcmpl-test"
CREATED = 1700000000
SERVED_MODEL = "served-model"


@dataclass(frozen=True)
class Stall:
    """Say nothing for this long (cut short when the server stops or the client goes away)."""

    seconds: float


@dataclass(frozen=True)
class Reset:
    """Drop the connection with a TCP reset, as a crashed proxy or server does."""


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are, inside the chunked body."""

    data: bytes


@dataclass(frozen=True)
class Drip:
    """Keep sending SSE comments until the client goes away (then count a disconnect), for at
    most `limit` seconds: an upstream still generating."""

    interval: float = 0.01
    limit: float = 20.0


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    stream: list[Any] = field(default_factory=list)
    # Silence before the status line: a server that accepted the connection and hangs (cut
    # short like a Stall).
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any
    client_port: int = 0


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": SERVED_MODEL,
        "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason, **choice}],
        "usage": None,
    }


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": SERVED_MODEL,
        "system_fingerprint": "fp_test",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def text_stream(*pieces: str, finish_reason: str = "stop", usage: tuple[int, int] | None = (10, 3), **choice: Any) -> list[Any]:
    items: list[Any] = [chunk({"role": "assistant", "content": ""})]
    items += [chunk({"content": piece}) for piece in pieces]
    items.append(chunk({}, finish_reason, **choice))
    if usage is not None:
        items.append(usage_chunk(*usage))
    items.append("[DONE]")
    return items


def tool_stream(*calls: tuple[str, str, list[str]], finish_reason: str = "tool_calls", usage: tuple[int, int] = (20, 9)) -> list[Any]:
    """Calls as (id, name, argument fragments), streamed one after the other as OpenAI does."""
    items: list[Any] = [chunk({"role": "assistant", "content": None})]
    for position, (call_id, name, fragments) in enumerate(calls):
        opening = {"index": position, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        items.append(chunk({"tool_calls": [opening]}))
        items += [chunk({"tool_calls": [{"index": position, "function": {"arguments": fragment}}]}) for fragment in fragments]
    items += [chunk({}, finish_reason), usage_chunk(*usage), "[DONE]"]
    return items


def streamed(items: list[Any]) -> Reply:
    return Reply(stream=items)


def error_reply(status: int, message: str, *, error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Reply:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return Reply(status=status, headers={"Content-Type": "application/json", **(headers or {})}, body=json.dumps(body).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test asserts on `requests`; stderr noise helps nobody

    def do_POST(self) -> None:
        upstream = self.server.upstream
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        headers = {name.lower(): value for name, value in self.headers.items()}
        with upstream.lock:
            upstream.requests.append(Received(self.path, headers, body, self.client_address[1]))
            upstream.in_flight += 1
            upstream.peak_in_flight = max(upstream.peak_in_flight, upstream.in_flight)
        reply = upstream.next_reply(self.path)
        try:
            self._answer(reply)
        except OSError:
            self.close_connection = True
        finally:
            with upstream.lock:
                upstream.in_flight -= 1

    def _answer(self, reply: Reply) -> None:
        if reply.delay and self._stall(reply.delay):
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.body is not None or reply.status != 200:
            body = reply.body or b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for item in reply.stream:
            if isinstance(item, Stall):
                if self._stall(item.seconds):
                    return
            elif isinstance(item, Reset):
                self._reset()
                return
            elif isinstance(item, Drip):
                self._drip(item)
                return
            elif isinstance(item, Raw):
                self._send(item.data)
            elif item == "[DONE]":
                self._send(b"data: [DONE]\n\n")
            else:
                self._send(b"data: " + json.dumps(item).encode() + b"\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stall(self, seconds: float) -> bool:
        """Say nothing for `seconds`; True when cut short: the server stops, or the client went
        away (a disconnect)."""
        upstream = self.server.upstream
        deadline = time.monotonic() + seconds
        while not upstream.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and self._client_gone():
                with upstream.lock:
                    upstream.disconnects += 1
                self.close_connection = True
                return True
            if readable:
                upstream.stopping.wait(min(left, 0.05))  # bytes from the client: not an end
        return True

    def _client_gone(self) -> bool:
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _send(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a RST instead of a FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _drip(self, drip: Drip) -> None:
        upstream = self.server.upstream
        waited = 0.0
        while waited < drip.limit:
            try:
                self._send(b": still generating\n\n")
            except OSError:
                with upstream.lock:
                    upstream.disconnects += 1
                self.close_connection = True
                return
            if upstream.stopping.wait(drip.interval):
                return
            waited += drip.interval

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the connection was reset on purpose, or by the client


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Hundreds of clients may connect at once (the concurrency tests).
    request_queue_size = 512
    upstream: OpenAIUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (a cancelled message, a retry after a stall) is what several
        # tests do on purpose; anything else is still printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OpenAIUpstream:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.disconnects = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._replies: deque[Reply] = deque()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def script(self, *replies: Reply) -> None:
        self._replies.extend(replies)

    def next_reply(self, path: str) -> Reply:
        if path != "/v1/chat/completions":
            return error_reply(404, f"No route {path}", error_type="not_found_error")
        with self.lock:
            if self._replies:
                return self._replies.popleft()
        return error_reply(500, "The test scripted no reply for this request.", error_type="server_error")

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def openai_upstream() -> Iterator[OpenAIUpstream]:
    upstream = OpenAIUpstream()
    yield upstream
    upstream.close()


# --- Anthropic's Messages API ----------------------------------------------------------------
#
# `AnthropicUpstream` answers POST {base_url}/v1/messages the way Anthropic documents its
# streaming Messages API: `Content-Type: text/event-stream`, each event as `event: <type>` plus
# `data: {json}` (message_start, content_block_start/delta/stop, message_delta, message_stop,
# `ping` in between, `error` for a failure in the middle), no `[DONE]`. Errors are JSON bodies
# `{"type": "error", "error": {"type", "message"}}`. Scripted like `OpenAIUpstream`: a stream is a
# list whose dicts are events (sent with their `type` as the event name) and whose other items
# are the same misbehaving actions.

ANTHROPIC_MESSAGE_ID = "msg_upstream_01"


def anthropic_streamed(items: list[Any]) -> Reply:
    return Reply(stream=[_anthropic_event(item) if isinstance(item, dict) else item for item in items])


def _anthropic_event(event: dict[str, Any]) -> Raw:
    return Raw(b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n")


def anthropic_start(input_tokens: int = 10, **usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": ANTHROPIC_MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": SERVED_MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
        },
    }


def anthropic_block(index: int, block: dict[str, Any], *deltas: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole content block: its start, its deltas, its stop."""
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        *({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas),
        {"type": "content_block_stop", "index": index},
    ]


def anthropic_end(stop_reason: str = "end_turn", output_tokens: int = 3, stop_sequence: str | None = None) -> list[dict[str, Any]]:
    return [
        {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": {"output_tokens": output_tokens}},
        {"type": "message_stop"},
    ]


def anthropic_text_stream(*pieces: str, stop_reason: str = "end_turn", output_tokens: int = 3) -> list[Any]:
    return [
        anthropic_start(),
        {"type": "ping"},
        *anthropic_block(0, {"type": "text", "text": ""}, *({"type": "text_delta", "text": piece} for piece in pieces)),
        *anthropic_end(stop_reason, output_tokens),
    ]


def anthropic_error_reply(status: int, message: str, *, error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Reply:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return Reply(status=status, headers={"Content-Type": "application/json", **(headers or {})}, body=json.dumps(body).encode())


class AnthropicUpstream(OpenAIUpstream):
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def next_reply(self, path: str) -> Reply:
        if path != "/v1/messages":
            return anthropic_error_reply(404, f"No route {path}", error_type="not_found_error")
        with self.lock:
            if self._replies:
                return self._replies.popleft()
        return anthropic_error_reply(500, "The test scripted no reply for this request.", error_type="api_error")


@pytest.fixture
def anthropic_upstream() -> Iterator[AnthropicUpstream]:
    upstream = AnthropicUpstream()
    yield upstream
    upstream.close()
