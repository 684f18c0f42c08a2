"""A webhook receiver for the tests: a real HTTP server on loopback, in a thread of the test
process, that keeps every request and answers as scripted.

`receiver.script(500, 500, 500)` answers the next three requests with 500, the rest with 200;
`HOLD` keeps a request unanswered until `release()` (or the server stops): a receiver that
never answers. `verified()` checks every request's signature with the `standardwebhooks`
library, as a receiver following the specification would.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook

HOLD = "hold"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int | None = None

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        received = Received({key.lower(): value for key, value in self.headers.items()}, body)
        receiver = self.server.receiver
        with receiver.lock:
            receiver.requests.append(received)
            answer = receiver.answers.popleft() if receiver.answers else 200
            if answer == HOLD:
                receiver.holding += 1
        if answer == HOLD:
            receiver.released.wait(timeout=60)
            with receiver.lock:
                receiver.holding -= 1
            answer = 200
        try:
            self.send_response(int(answer))
            self.send_header("Content-Length", "0")
            self.end_headers()
            received.answered = int(answer)
        except OSError:
            pass  # the sender gave up waiting


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


class Receiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Received] = []
        self.answers: deque[int | str] = deque()
        self.holding = 0
        self.released = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hooks"

    def script(self, *answers: int | str) -> None:
        self.answers.extend(answers)

    def release(self) -> None:
        self.released.set()

    def answered(self) -> list[Received]:
        with self.lock:
            return [received for received in self.requests if received.answered is not None]

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every request's event, each checked against its signature (raises if one fails)."""
        with self.lock:
            requests = list(self.requests)
        return [dict(Webhook(secret).verify(received.body, received.headers)) for received in requests]

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()
