"""Request bodies sent chunked (`Transfer-Encoding: chunked`, no Content-Length), as a client
sends a body it streams, against the servers the README runs: uvicorn for everything, and
gunicorn for the ordinary endpoints. Django's test client always sends a Content-Length, so
only real servers show this.

A chunked body is read like any other, within MESSAGING_MAX_BODY_BYTES; a larger one is 413
once the limit is passed by one byte: the tests send that much and no more, keeping the body
open, and the answer must come anyway.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from messaging.models import APIKey, MessageJob
from tests.processes import STOP_TIMEOUT, cluster_env, free_port, spawn, wait_until

pytestmark = pytest.mark.e2e

LIMIT = 2048
REQUEST = {"messages": [{"role": "user", "content": "sent in pieces"}], "correlation_id": "chunked-1"}


@pytest.fixture
def key(transactional_db: None) -> str:
    return APIKey.objects.create_key(name="alice", owner="alice")[1]


class Gunicorn:
    """`gunicorn project.wsgi:application`, as the README runs the ordinary endpoints."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = spawn(
            [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", f"127.0.0.1:{self.port}", "--workers", "1"],
            env,
            log_path,
        )
        wait_until(self._answers, timeout=30, what=f"gunicorn to answer; log:\n{self.log_path.read_text(errors='replace')}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"gunicorn exited; log:\n{self.log_path.read_text(errors='replace')}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(params=["uvicorn", "gunicorn"])
def server(request: pytest.FixtureRequest, start_server: Callable[..., Any], tmp_path: Path) -> Iterator[Any]:
    if request.param == "uvicorn":
        yield start_server(MESSAGING_MAX_BODY_BYTES=str(LIMIT))
        return
    gunicorn = Gunicorn(cluster_env(MESSAGING_MAX_BODY_BYTES=str(LIMIT)), tmp_path / "gunicorn.log")
    yield gunicorn
    gunicorn.stop()


def pieces(body: bytes, size: int = 7) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, one chunk per piece."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def post_chunked(server: Any, key: str, url: str, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}{url}", content=pieces(body), headers=headers, timeout=30)
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    return response


def answer_to_an_unfinished_body(server: Any, key: str, url: str, size: int) -> bytes:
    """Send a chunked body's first `size` bytes, never its end, and read what the server says."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(
            f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"%x\r\n%s\r\n" % (size, b" " * size)
        )
        answer = b""

        def whole() -> bool:
            head, found, body = answer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), None)
            return bool(found) and length is not None and len(body) >= length

        while not whole():
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer


ENDPOINTS = {"/v1/messages/validate": 200, "/v1/messages/async": 202}


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_chunked_body_is_read_like_any_other(server: Any, key: str, url: str) -> None:
    response = post_chunked(server, key, url, json.dumps(REQUEST).encode())

    assert response.status_code == ENDPOINTS[url], response.text
    if url.endswith("/validate"):
        assert response.json()["valid"] is True
    else:
        assert MessageJob.objects.get().correlation_id == "chunked-1"


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_chunked_body_of_exactly_the_limit_is_read(server: Any, key: str, url: str) -> None:
    body = json.dumps(REQUEST).encode()
    body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(body) == LIMIT

    assert post_chunked(server, key, url, body).status_code == ENDPOINTS[url]


@pytest.mark.parametrize("url", ENDPOINTS)
def test_an_empty_chunked_body_is_refused_as_empty(server: Any, key: str, url: str) -> None:
    response = post_chunked(server, key, url, b"")

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request body is empty; send a JSON object."


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_chunked_body_past_the_limit_is_413_after_one_byte_too_many(server: Any, key: str, url: str) -> None:
    answer = answer_to_an_unfinished_body(server, key, url, LIMIT + 1)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert not MessageJob.objects.exists()


class TestTheSynchronousEndpoint:
    """POST /v1/messages is an async view: uvicorn only (see the README's "Web servers")."""

    def test_it_reads_a_chunked_body(self, start_server: Callable[..., Any], key: str) -> None:
        server = start_server(MESSAGING_MAX_BODY_BYTES=str(LIMIT))

        response = post_chunked(server, key, "/v1/messages", json.dumps(REQUEST).encode())

        assert response.status_code == 200, response.text
        assert response.json()["content"] == [{"type": "text", "text": "sent in pieces"}]

    def test_a_chunked_body_past_the_limit_is_413_after_one_byte_too_many(self, start_server: Callable[..., Any], key: str) -> None:
        server = start_server(MESSAGING_MAX_BODY_BYTES=str(LIMIT))

        answer = answer_to_an_unfinished_body(server, key, "/v1/messages", LIMIT + 1)

        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_too_large"
        assert not MessageJob.objects.exists()
