"""Time to first token the service adds over calling a model server directly.

    python bench/bench_ttft.py                         # SQLite, about 1 min 45 s
    python bench/bench_ttft.py --requests 300 --latency 0.2
    DATABASE_URL=postgres://... REDIS_URL=redis://... python bench/bench_ttft.py

A local model server speaking OpenAI's streaming Chat Completions (a threaded HTTP server in
this process) answers every request after a fixed latency: the response headers at once, the
first content chunk `--latency` seconds later, then `--chunks` more a `--token-interval` apart,
the usage chunk and `[DONE]`, as vLLM and OpenAI do. The service runs as the README serves it
(uvicorn, `project.asgi:application`, httptools, uvloop, `--web-workers` processes) with a
models file naming that server as the model `upstream` (provider "openai"), beside a real
`manage.py qcluster` for the asynchronous path.

Three ways to the first token, measured in turn within each round (so the machine's noise
falls on all three alike), `--requests` rounds after `--warmup` unmeasured ones:

1. direct: POST /v1/chat/completions to the model server, until the first chunk with content;
2. sync stream: POST /v1/messages {stream: true}, until the first `content_block_delta`;
3. async + stream: POST /v1/messages/async {stream: true}, then at once
   GET /v1/messages/{id}/stream, from the POST being sent until the first `content_block_delta`.

Every request opens its own connection, as the service's own upstream calls do. The figures
are p50 and p99 of each, and what the service adds (its percentile minus direct's) against
the aims: 10 ms (sync) and 50 ms (async) at p50.

The store is whatever the environment says: a fresh SQLite database in a temporary DATA_DIR
by default, or `DATABASE_URL` / `REDIS_URL` when set (this run's messages and key are deleted
afterwards). Everything started is stopped on the way out, errors and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_api import free_port, manage, revision, stop_process, store_description  # noqa: E402

PYTHON = sys.executable
OWNER = "bench-ttft"
AIMS_MS = {"sync stream": 10.0, "async + stream": 50.0}
PROMPT = {"role": "user", "content": "Say hello in a few words."}


# --- The model server ----------------------------------------------------------------------------


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = (
    b'data: {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, '
    b'"model": "bench-model", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}\n\n'
)


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        settings = self.server.settings
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            # Headers at once, the first token after the model's latency: what vLLM and OpenAI do.
            time.sleep(settings["latency"])
            self._send(_chunk({"role": "assistant", "content": ""}) + _chunk({"content": "Hello"}))
            for number in range(settings["chunks"]):
                time.sleep(settings["token_interval"])
                self._send(_chunk({"content": f" word{number}"}))
            self._send(_chunk({}, "stop") + USAGE + b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True  # a connection per request, as the provider opens
        except OSError:
            self.close_connection = True  # the client went away

    def _send(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    settings: dict[str, Any]


@contextmanager
def model_server(latency: float, chunks: int, token_interval: float) -> Iterator[int]:
    server = _UpstreamServer(("127.0.0.1", 0), _UpstreamHandler)
    server.settings = {"latency": latency, "chunks": chunks, "token_interval": token_interval}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


# --- The service ---------------------------------------------------------------------------------


def _answers(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextmanager
def uvicorn(env: dict[str, str], workers: int, log_path: Path) -> Iterator[int]:
    port = free_port()
    command = [
        PYTHON, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--http", "httptools", "--loop", "uvloop",
        "--timeout-graceful-shutdown", "5", "--no-access-log",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start; see {log_path}")
            time.sleep(0.1)
        yield port
    finally:
        stop_process(process, timeout=20)


@contextmanager
def qcluster(env: dict[str, str], log_path: Path) -> Iterator[None]:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [PYTHON, "manage.py", "qcluster"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        time.sleep(1.0)
        if process.poll() is not None:
            raise RuntimeError(f"qcluster exited with {process.returncode}; see {log_path}")
        yield
    finally:
        stop_process(process, timeout=30)


# --- The clients ---------------------------------------------------------------------------------


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        line = response.readline()
        if not line:
            return
        yield line


def direct(upstream_port: int) -> float:
    """Seconds from sending the request to the model server until its first content chunk."""
    body = json.dumps({"model": "bench-model", "messages": [PROMPT], "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.status
        for line in _lines(response):
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                elapsed = time.perf_counter() - started
                response.read()  # to the end, as the service does
                return elapsed
        raise RuntimeError("the model server sent no content")
    finally:
        connection.close()


def _first_delta(response: http.client.HTTPResponse, started: float, what: str) -> tuple[float, float]:
    """Seconds from `started` to the first content_block_delta, and to message_start (which the
    service records as soon as the model server's response headers arrive: the time before
    it is the service's own, before the upstream call)."""
    if response.status != 200:
        raise RuntimeError(f"{what} answered {response.status}: {response.read()[:500]!r}")
    message_start = math.nan
    for line in _lines(response):
        if line.startswith(b"event: message_start"):
            message_start = time.perf_counter() - started
        elif line.startswith(b"event: content_block_delta"):
            return time.perf_counter() - started, message_start
    raise RuntimeError(f"{what} ended without a content_block_delta")


def _headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


def sync_stream(port: int, key: str) -> tuple[float, float]:
    body = json.dumps({"model": "upstream", "stream": True, "max_tokens": 256, "messages": [PROMPT]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/messages", body=body, headers=_headers(key))
        response = connection.getresponse()
        times = _first_delta(response, started, "POST /v1/messages")
        response.read()  # to the end: leaving early would cancel the message
        return times
    finally:
        connection.close()


def async_stream(port: int, key: str) -> tuple[float, float]:
    body = json.dumps({"model": "upstream", "stream": True, "max_tokens": 256, "messages": [PROMPT]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/messages/async", body=body, headers=_headers(key))
        response = connection.getresponse()
        accepted = json.loads(response.read())
        if response.status != 202:
            raise RuntimeError(f"POST /v1/messages/async answered {response.status}: {accepted}")
        connection.request("GET", f"/v1/messages/{accepted['message_id']}/stream", headers=_headers(key))
        response = connection.getresponse()
        times = _first_delta(response, started, "GET /v1/messages/{id}/stream")
        response.read()
        return times
    finally:
        connection.close()


# --- The figures ---------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: p99 of 100 values is the 99th smallest."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def report(samples: dict[str, list[float]], starts: dict[str, list[float]], latency: float) -> None:
    direct_p = {p: percentile(samples["direct"], p) * 1000 for p in (0.5, 0.99)}
    print(f"\n{'path':<16}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}{'aim (p50)':>11}")
    for path, values in samples.items():
        p50, p99 = (percentile(values, p) * 1000 for p in (0.5, 0.99))
        if path == "direct":
            print(f"{path:<16}{p50:>9.1f}{p99:>9.1f}")
            continue
        added50, added99 = p50 - direct_p[0.5], p99 - direct_p[0.99]
        verdict = "met" if added50 <= AIMS_MS[path] else "MISSED"
        print(f"{path:<16}{p50:>9.1f}{p99:>9.1f}{added50:>11.1f}{added99:>11.1f}   <= {AIMS_MS[path]:.0f} {verdict}")
    # Where the added time goes: before the model server was called (to message_start), and
    # between its first token and the client (first delta - message_start - the latency).
    print(f"\n{'where (p50 ms)':<16}{'to message_start':>18}{'first token to client':>23}")
    for path, values in starts.items():
        before = percentile(values, 0.5) * 1000
        after = percentile([delta - start - latency for delta, start in zip(samples[path], values)], 0.5) * 1000
        print(f"{path:<16}{before:>18.1f}{after:>23.1f}")


def forget_run(env: dict[str, str], since: str) -> str:
    code = f"""
from django.utils.dateparse import parse_datetime
from messaging.models import APIKey, MessageJob
since = parse_datetime({since!r})
deleted = MessageJob.objects.filter(owner={OWNER!r}, created_at__gte=since).delete()[1].get("messaging.MessageJob", 0)
APIKey.objects.filter(owner={OWNER!r}, created__gte=since).delete()
print(f"{{deleted}} messages of this run and its API key deleted", end="")
"""
    return manage(env, "shell", "--no-imports", "-c", code).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="measured rounds, one request per path each (100)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first (5)")
    parser.add_argument("--latency", type=float, default=0.1, help="model server's seconds to first token (0.1)")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks after the first (8)")
    parser.add_argument("--token-interval", type=float, default=0.02, help="seconds between chunks (0.02)")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes (2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, SQLite)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ttft-"))
    env = dict(os.environ, DATA_DIR=str(work / "data"), PYTHONUNBUFFERED="1")
    env.pop("DJANGO_SETTINGS_MODULE", None)  # project.settings, as served
    external = bool(env.get("DATABASE_URL"))
    started_at = datetime.now(timezone.utc).isoformat()
    print(f"{datetime.now():%Y-%m-%d %H:%M}, commit {revision()}, {os.cpu_count()} cores")
    print(store_description(env))
    print(
        f"model server: first token after {args.latency * 1000:.0f} ms, then {args.chunks} chunks "
        f"{args.token_interval * 1000:.0f} ms apart; uvicorn {args.web_workers} workers + qcluster "
        f"({env.get('MESSAGING_WORKERS', '2')} workers); {args.warmup} + {args.requests} rounds"
    )
    tuned = [f"{name}={env[name]}" for name in ("MESSAGING_FLUSH_INTERVAL", "MESSAGING_POLL_INTERVAL", "MESSAGING_WORKERS") if name in env]
    if tuned:
        print(f"settings from the environment: {' '.join(tuned)}")
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)

    samples: dict[str, list[float]] = {"direct": [], "sync stream": [], "async + stream": []}
    starts: dict[str, list[float]] = {"sync stream": [], "async + stream": []}
    try:
        with ExitStack() as stack:
            upstream_port = stack.enter_context(model_server(args.latency, args.chunks, args.token_interval))
            models_file = work / "models.toml"
            models_file.write_text(
                "[models.upstream]\n"
                'provider = "openai"\n'
                f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
                "max_tokens = 1024\n"
                "max_attempts = 1\n"
                "read_timeout = 10\n"
            )
            env["MESSAGING_MODELS_FILE"] = str(models_file)
            manage(env, "migrate", "--noinput")
            key = manage(env, "create_api_key", "--owner", OWNER).strip().splitlines()[-1]
            port = stack.enter_context(uvicorn(env, args.web_workers, work / "uvicorn.log"))
            stack.enter_context(qcluster(env, work / "qcluster.log"))

            paths: dict[str, Callable[[], tuple[float, float]]] = {
                "direct": lambda: (direct(upstream_port), math.nan),
                "sync stream": lambda: sync_stream(port, key),
                "async + stream": lambda: async_stream(port, key),
            }
            for round_number in range(args.warmup + args.requests):
                for path, measure in paths.items():
                    elapsed, message_start = measure()
                    if round_number >= args.warmup:
                        samples[path].append(elapsed)
                        if path in starts:
                            starts[path].append(message_start)
                if (round_number + 1) % 25 == 0:
                    print(f"  {round_number + 1} rounds", flush=True)
        report(samples, starts, args.latency)
        print(f"\nload average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        if external:
            print(forget_run(env, started_at))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # SIGTERM as Ctrl-C, so that the servers started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    main()
