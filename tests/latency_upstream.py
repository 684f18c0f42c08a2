"""A model server of fixed latency that holds thousands of requests at once, and counts them.

It answers POST /v1/chat/completions as OpenAI streams Chat Completions (the format of
`tests.upstreams.text_stream`): response headers at once, the first word `latency` seconds
later, then `words - 1` more words `interval` seconds apart, a `stop` chunk, the usage chunk and
`data: [DONE]`. `latency=2, words=5, interval=0` is "a model that answers in 2 s";
`latency=1, words=20, interval=1` is "one word per second for 20 s".

It counts requests, the requests in flight now and at most (`peak`), and `disconnects`: requests
whose client left before the answer ended (a cancelled message must close its upstream request).
One asyncio loop (uvicorn, httptools, uvloop, keep-alive) serves them all: a waiting request
costs a few kilobytes, not a thread.

In a test, `LatencyUpstream(latency=2)` runs in a background thread with its own loop; read
`upstream.stats()`, call `upstream.reset()`, and `upstream.close()` (or use the
`start_latency_upstream` fixture). As a process, for a benchmark:

    python -m tests.latency_upstream --port 0 --latency 2      # prints "port 41234"

and GET /stats answers the counters as JSON; POST /reset resets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

_CHUNK_HEAD = '{"id": "chatcmpl-latency", "object": "chat.completion.chunk", "created": 1700000000, "model": "latency-model"'
_EVENT_STREAM = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return f'data: {_CHUNK_HEAD}, "choices": [{json.dumps(choice)}], "usage": null}}\n\n'.encode()


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return f'data: {_CHUNK_HEAD}, "choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode()


class LatencyApp:
    """The raw ASGI application; its counters are touched only on its own event loop."""

    def __init__(self, latency: float = 2.0, words: int = 5, interval: float = 0.0):
        self.latency, self.words, self.interval = latency, words, interval
        self.requests = self.current = self.peak = self.completed = self.disconnects = 0

    def stats(self) -> dict[str, int]:
        names = ("requests", "current", "peak", "completed", "disconnects")
        return {name: getattr(self, name) for name in names}

    def reset(self) -> None:
        """Forget what was counted; requests still in flight stay counted in `current`."""
        self.requests = self.completed = self.disconnects = 0
        self.peak = self.current

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        route = (scope["method"], scope["path"])
        await self._body(receive)
        if route == ("POST", "/v1/chat/completions"):
            await self._complete(receive, send)
        elif route == ("GET", "/stats"):
            await self._json(send, 200, self.stats())
        elif route == ("POST", "/reset"):
            self.reset()
            await self._json(send, 200, self.stats())
        else:
            await self._json(send, 404, {"error": {"message": f"No route {route}", "type": "not_found_error"}})

    async def _complete(self, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        self.requests += 1
        self.current += 1
        self.peak = max(self.peak, self.current)
        answer = asyncio.create_task(self._stream(send))
        # After the body, receive() returns only when the client goes (or the answer ended).
        gone = asyncio.create_task(receive())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done() and answer.exception() is None:
                self.completed += 1
            else:
                self.disconnects += 1
        finally:
            self.current -= 1
            for task in (answer, gone):
                task.cancel()
            await asyncio.gather(answer, gone, return_exceptions=True)

    async def _stream(self, send: Callable[..., Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _EVENT_STREAM})
        await send({"type": "http.response.body", "body": _chunk({"role": "assistant", "content": ""}), "more_body": True})
        await asyncio.sleep(self.latency)
        for number in range(self.words):
            if number:
                await asyncio.sleep(self.interval)
            await send({"type": "http.response.body", "body": _chunk({"content": f" word{number}"}), "more_body": True})
        end = _chunk({}, "stop") + _usage(12, self.words) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": end})

    @staticmethod
    async def _body(receive: Callable[..., Any]) -> None:
        """Read (and ignore) the request body: receive() reports a disconnect only after it."""
        while (await receive()).get("more_body"):
            pass

    @staticmethod
    async def _json(send: Callable[..., Any], status: int, payload: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def _server(app: LatencyApp) -> uvicorn.Server:
    config = uvicorn.Config(
        app, http="httptools", loop="uvloop", lifespan="off", access_log=False, log_level="warning",
        backlog=4096, timeout_keep_alive=30,
    )  # fmt: skip
    return uvicorn.Server(config)


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class LatencyUpstream:
    """The server in a background thread of this process, on its own event loop."""

    def __init__(self, latency: float = 2.0, words: int = 5, interval: float = 0.0):
        self.app = LatencyApp(latency, words, interval)
        self._sock = _listening_socket(0)
        self.port = int(self._sock.getsockname()[1])
        self._server = _server(self.app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the latency upstream did not start")
            self._thread.join(0.01)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        return self.app.stats()

    def reset(self) -> None:
        # On the server's loop: a counter reset between another thread's read and write is lost.
        done = threading.Event()
        self._server.servers[0].get_loop().call_soon_threadsafe(lambda: (self.app.reset(), done.set()))
        if not done.wait(5):
            raise RuntimeError("the latency upstream's loop did not answer")

    def close(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # do not wait for streams still open
        self._thread.join(10)
        self._sock.close()


@pytest.fixture
def start_latency_upstream() -> Iterator[Callable[..., LatencyUpstream]]:
    """`start_latency_upstream(latency=2)`; every upstream started is closed after the test."""
    started: list[LatencyUpstream] = []

    def start(**behaviour: Any) -> LatencyUpstream:
        started.append(LatencyUpstream(**behaviour))
        return started[-1]

    yield start
    for upstream in started:
        upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A model server of fixed latency (OpenAI's streaming Chat Completions).")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds to the first word (2)")
    parser.add_argument("--words", type=int, default=5, help="words in each answer (5)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between words (0)")
    args = parser.parse_args()
    sock = _listening_socket(args.port)
    print(f"port {sock.getsockname()[1]}", flush=True)
    _server(LatencyApp(args.latency, args.words, args.interval)).run(sockets=[sock])


if __name__ == "__main__":
    main()
