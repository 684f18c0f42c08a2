"""Requests per second of /v1/messages/validate and /v1/messages/async against a bare Django view.

    python bench/bench_api.py                      # gunicorn, sync workers, 2 x cores
    python bench/bench_api.py --configs sync:3 sync:4 sync:5 gthread:4x4 --rounds 2
    python bench/bench_api.py --layers             # also DRF alone and DRF + API key lookup

The project is served as the README recommends for production (gunicorn, `project.wsgi`, sync
workers), with `bench.settings`, which differs from `project.settings` only by a URLconf that
adds `POST /bench/bare`: a plain Django function view that parses the body and answers
`{"ok": true}`. All three endpoints therefore run in the same server processes, behind the same
middleware, and the ratios say what the API itself costs on top of Django.

Load comes from `wrk` (one thread: the machine it was written for has two cores, shared with
the server), in the order bare, validate, async, bare; the baseline is the mean of the two bare
runs, and their spread says how much to trust a ratio. Besides wrk's req/s and latencies, each
run reports the CPU time gunicorn's processes spent per request (from /proc): on a shared
machine throughput swings with the neighbours' load, CPU per request hardly does.

The store is whatever the environment says: a fresh SQLite database in a temporary DATA_DIR by
default, or `DATABASE_URL` / `REDIS_URL` when set. No qcluster runs, so every accepted async
message stays queued; the queue grows by one token per request during the run. With an external
store, this run's messages and its API key are deleted afterwards (unless `--keep`); queued
tokens without a message are harmless (a worker that takes one finds nothing and returns).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OWNER = "bench"
# Settings refuse to start without a SECRET_KEY: one per run, shared by every process the run
# starts (django-q2 signs tasks with it). The other bench scripts import this module first.
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))

# Representative, not trivial: what a chat client with one tool sends on its third turn.
BODY: dict[str, object] = {
    "system": {
        "prompt": "You are a concise support assistant for an online bookshop. Use the tools to "
        "look orders up, quote the order number in every answer, and never invent tracking data."
    },
    "messages": [
        {
            "role": "user",
            "content": "Hi! I ordered three books last week and only two arrived. "
            "Can you check order 48213 for me?",
        },
        {
            "role": "assistant",
            "content": "Of course. Let me look up order 48213 and see what happened to the third book.",
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Thanks. The missing one is 'The Left Hand of Darkness'."},
                {"type": "text", "text": "If it is lost, I would rather have a refund than a replacement."},
            ],
        },
    ],
    "tools": [
        {
            "name": "lookup_order",
            "description": "Look an order up by its number: its items and their shipping status.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "The order number, digits only."},
                    "include_items": {"type": "boolean", "default": True},
                },
                "required": ["order_id"],
            },
        }
    ],
    "tool_choice": {"type": "auto"},
    "max_tokens": 512,
    "temperature": 0.7,
    "correlation_id": "bench-order-48213",
}

ENDPOINTS = {
    "bare": "/bench/bare",
    "drf": "/bench/drf",
    "drf-auth": "/bench/drf-auth",
    "validate": "/v1/messages/validate",
    "async": "/v1/messages/async",
}

# `done` prints one line we parse, rather than scraping wrk's human report. wrk counts a
# status of 400 or more in errors.status (its "Non-2xx or 3xx responses" line).
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH requests=%d duration_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class ServerConfig:
    worker_class: str
    workers: int
    threads: int = 1

    @classmethod
    def parse(cls, text: str) -> ServerConfig:
        """`sync:4` or `gthread:4x4` (workers x threads)."""
        worker_class, _, size = text.partition(":")
        workers, _, threads = size.partition("x")
        if worker_class not in {"sync", "gthread"} or not workers.isdigit() or (threads and not threads.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r} is not sync:N or gthread:NxT")
        return cls(worker_class, int(workers), int(threads or 1))

    def __str__(self) -> str:
        if self.worker_class == "gthread":
            return f"gthread {self.workers} workers x {self.threads} threads"
        return f"sync {self.workers} workers"

    def gunicorn_args(self) -> list[str]:
        args = ["--workers", str(self.workers), "--worker-class", self.worker_class]
        if self.worker_class == "gthread":
            args += ["--threads", str(self.threads)]
        return args


@dataclass(frozen=True)
class Result:
    endpoint: str
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # gunicorn's CPU time (all its processes) per request; NaN without /proc

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def store_description(env: dict[str, str]) -> str:
    database_url = env.get("DATABASE_URL", "")
    redis_url = env.get("REDIS_URL", "")
    if database_url:
        parts = urlsplit(database_url)
        database = f"{parts.scheme} {parts.hostname}:{parts.port or ''}{parts.path}"
    else:
        database = f"SQLite {env['DATA_DIR']}/db.sqlite3"
    queue = f"Redis {redis_url}" if redis_url else "django-q2 ORM broker (same database)"
    return f"database: {database}; queue: {queue}"


def revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM to the main process only (signalling a qcluster's group can hang it), then SIGKILL
    to its session if it does not stop in time, and to whatever it left behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, path: str, key: str) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            path,
            body=json.dumps(BODY),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def check_endpoints(port: int, key: str) -> None:
    """Measure the paths we mean to measure: a valid body, accepted; not an error path."""
    status, body = post(port, ENDPOINTS["bare"], key)
    assert status == 200 and body == {"ok": True}, (status, body)
    for endpoint in ("drf", "drf-auth"):
        status, body = post(port, ENDPOINTS[endpoint], key)
        assert status == 200 and body == {"ok": True}, (endpoint, status, body)
    status, body = post(port, ENDPOINTS["validate"], key)
    assert status == 200 and body.get("valid") is True and body.get("errors") == [], (status, body)
    status, body = post(port, ENDPOINTS["async"], key)
    assert status == 202 and body.get("status") == "pending", (status, body)


@dataclass(frozen=True)
class Server:
    port: int
    pid: int  # the master's


@contextmanager
def gunicorn(config: ServerConfig, env: dict[str, str], log_path: Path) -> Iterator[Server]:
    port = free_port()
    command = [
        PYTHON, "-m", "gunicorn", "project.wsgi:application",
        "--bind", f"127.0.0.1:{port}", *config.gunicorn_args(),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                sys.exit(f"gunicorn exited with {server.returncode}; see {log_path}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"gunicorn did not answer /healthz within 30 s; see {log_path}")
                time.sleep(0.1)
            finally:
                connection.close()
        yield Server(port, server.pid)
    finally:
        # SIGTERM to the master only: it stops its workers gracefully.
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def server_cpu_seconds(master: int) -> float:
    """User + system CPU time of the gunicorn master and its workers so far.

    Throughput moves with whatever else the machine runs; CPU time per request barely does,
    so it is the steadier figure on a shared machine.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in [str(master), *children]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return math.nan
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def run_wrk(port: int, endpoint: str, script: Path, seconds: int, connections: int, master: int | None = None) -> Result:
    command = [
        "wrk", "--threads", "1", "--connections", str(connections), "--duration", f"{seconds}s",
        "--timeout", "10s", "--script", str(script), f"http://127.0.0.1:{port}{ENDPOINTS[endpoint]}",
    ]  # fmt: skip
    cpu_before = server_cpu_seconds(master) if master else math.nan
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu = server_cpu_seconds(master) - cpu_before if master else math.nan
    line = next((line for line in done.stdout.splitlines() if line.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    values = {name: int(value) for name, value in (item.split("=") for item in line.split()[1:])}
    return Result(
        endpoint=endpoint,
        requests=values["requests"],
        seconds=values["duration_us"] / 1e6,
        non2xx=values["non2xx"],
        socket_errors=values["connect"] + values["read"] + values["write"] + values["timeout"],
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        cpu_ms=cpu / max(values["requests"], 1) * 1000,
    )


def measure(config: ServerConfig, env: dict[str, str], key: str, args: argparse.Namespace, work: Path) -> list[Result]:
    scripts = {}
    for endpoint in ENDPOINTS:
        scripts[endpoint] = work / f"{endpoint}.lua"
        scripts[endpoint].write_text(WRK_SCRIPT.format(key=key, body=json.dumps(BODY)))
    results = []
    with gunicorn(config, env, work / "gunicorn.log") as server:
        port = server.port
        check_endpoints(port, key)
        sequence = ["bare", *(["drf", "drf-auth"] if args.layers else []), "validate", "async", "bare"]
        for _ in range(args.rounds):
            for endpoint in sequence:
                if args.warmup:
                    run_wrk(port, endpoint, scripts[endpoint], args.warmup, args.connections)
                result = run_wrk(port, endpoint, scripts[endpoint], args.duration, args.connections, server.pid)
                print(f"  {endpoint:<9} {result.rps:8.0f} req/s {result.cpu_ms:6.3f} CPU ms/req", flush=True)
                results.append(result)
    return results


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(config: ServerConfig, results: list[Result]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for endpoint in ENDPOINTS:
        runs = [result for result in results if result.endpoint == endpoint]
        if not runs:
            continue
        figures[endpoint] = mean([result.rps for result in runs])
        figures[f"{endpoint} cpu"] = mean([result.cpu_ms for result in runs])
    bare = [result.rps for result in results if result.endpoint == "bare"]
    figures["spread"] = (max(bare) - min(bare)) / figures["bare"]
    baseline, baseline_cpu = figures["bare"], figures["bare cpu"]
    print(
        f"\n{config}: bare baseline {baseline:.0f} req/s, {baseline_cpu:.3f} CPU ms/req "
        f"(mean of {len(bare)} runs; req/s spread {figures['spread']:.1%})"
    )
    print(
        f"{'endpoint':<10}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'non-2xx':>8}{'sockerr':>8}"
        f"{'vs bare':>8}{'CPU ms/req':>11}{'CPU vs bare':>12}"
    )
    for result in results:
        print(
            f"{result.endpoint:<10}{result.rps:>8.0f}{result.p50_ms:>8.1f}{result.p99_ms:>8.1f}"
            f"{result.non2xx:>8}{result.socket_errors:>8}{result.rps / baseline:>8.2f}"
            f"{result.cpu_ms:>11.3f}{baseline_cpu / result.cpu_ms:>12.2f}"
        )
    if any(result.non2xx or result.socket_errors for result in results):
        print("WARNING: some responses were errors; the figures above are not trustworthy.")
    return figures


def queue_state(env: dict[str, str], since: str, delete: bool) -> str:
    """How many messages this run stored and how long the queue is; delete them if asked."""
    code = f"""
from django.utils.dateparse import parse_datetime
from messaging.models import APIKey, MessageJob
from messaging.queue import shared_broker
jobs = MessageJob.objects.filter(owner={OWNER!r}, created_at__gte=parse_datetime({since!r}))
print(f"{{jobs.count()}} messages stored by this run, queue size {{shared_broker().queue_size()}}", end="")
if {delete!r}:
    jobs.delete()
    APIKey.objects.filter(owner={OWNER!r}, created__gte=parse_datetime({since!r})).delete()
    print("; this run's messages and API key deleted", end="")
"""
    return manage(env, "shell", "--no-imports", "-c", code).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        type=ServerConfig.parse,
        default=[ServerConfig("sync", 2 * (os.cpu_count() or 1))],
        help="gunicorn setups to measure, each `sync:WORKERS` or `gthread:WORKERSxTHREADS` "
        "(default: sync, 2 x cores workers)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per endpoint (10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat bare, validate, async, bare (1)")
    parser.add_argument(
        "--layers", action="store_true",
        help="also measure /bench/drf (DRF, no auth) and /bench/drf-auth (DRF + API key lookup)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir / this run's messages")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    env = dict(os.environ, DATA_DIR=str(work / "data"), DJANGO_SETTINGS_MODULE="bench.settings")
    external = bool(env.get("DATABASE_URL"))
    started = datetime.now(timezone.utc).isoformat()
    print(f"{datetime.now():%Y-%m-%d %H:%M}, commit {revision()}, {os.cpu_count()} cores, body {len(json.dumps(BODY))} bytes")
    print(store_description(env))
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    if env.get("DEBUG", "").lower() in {"1", "true", "yes", "on"}:
        print("WARNING: DEBUG is on; Django records every query and the figures mean little.")
    manage(env, "migrate", "--noinput")
    key = manage(env, "create_api_key", "--owner", OWNER).strip().splitlines()[-1]

    summary = {}
    try:
        for config in args.configs:
            print(f"\n== {config}, wrk 1 thread, {args.connections} connections, "
                  f"{args.warmup} s warm-up + {args.duration} s per endpoint", flush=True)
            summary[config] = report(config, measure(config, env, key, args, work))
        print(f"\nload average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        print(queue_state(env, started, delete=external and not args.keep))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if len(summary) > 1:
        print(
            f"\n{'gunicorn':<31}{'bare':>6}{'spread':>7}{'validate':>9}{'ratio':>6}{'async':>6}{'ratio':>6}"
            f"   CPU ms/req bare/validate/async"
        )
        for config, figures in summary.items():
            print(
                f"{config!s:<31}{figures['bare']:>6.0f}{figures['spread']:>7.1%}"
                f"{figures['validate']:>9.0f}{figures['validate'] / figures['bare']:>6.2f}"
                f"{figures['async']:>6.0f}{figures['async'] / figures['bare']:>6.2f}"
                f"   {figures['bare cpu']:.3f} / {figures['validate cpu']:.3f} / {figures['async cpu']:.3f}"
            )


if __name__ == "__main__":
    main()
