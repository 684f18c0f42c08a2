"""Streams under load: event delivery latency, how many open streams a server holds, and what
open streams cost ordinary requests.

    python bench/bench_stream.py                       # everything, about 4-5 minutes
    python bench/bench_stream.py --backends postgres+redis --skip capacity throughput
    python bench/bench_stream.py --levels 100 500 1000 2000 4000 --load-backends sqlite
    python bench/bench_stream.py --split              # also gunicorn for ordinary requests

Three figures, the ones issue 3 asks for:

1. Delivery latency, worker commit to client receipt. The server runs as the README serves it
   (uvicorn, httptools, uvloop, `--web-workers` processes). A writer process with the project's
   settings (this script, `--agent`) plays the worker: it appends one `content_block_delta` at a
   time to claimed messages through `jobs.append_events`, the call a worker makes, at Poisson
   intervals (`--rate` events a second over `--messages` messages), and stamps the clock in an
   `on_commit` hook that runs right after the commit (before the Redis publish), after one
   unmeasured event per message (the first Redis publish connects). Asyncio SSE
   clients in this process (`--clients`, spread over the messages) stamp every event as its
   chunk arrives. Latency = receipt - commit, per client and event, on CLOCK_MONOTONIC, which
   all processes of a Linux machine share. Once per backend, each with a fresh database:
   SQLite (the web processes poll every MESSAGING_POLL_INTERVAL), PostgreSQL + Redis (pub/sub)
   and PostgreSQL alone (LISTEN/NOTIFY).
2. Capacity: idle streams, each on its own message, opened in steps (`--levels`). At each step
   every stream must get its first event, ordinary requests are probed with wrk (GET /v1/models
   and POST /v1/messages/validate, 4 connections, 2 s each), one event is written to 50 of the
   streamed messages and must reach them (its latency is reported), and no stream may have
   dropped; a probe's p99 over `--p99-limit` (1 s) also fails the step, and the first step that
   fails stops the climb. Each step also shows the server's CPU use over 2 s with nothing but
   the streams open, and each worker's RSS, sockets and threads.
3. Ordinary throughput with `--streams` (500) idle streams open against none, same server:
   wrk (1 thread, 32 connections) on validate and models, in the order none, 500, none; the
   baseline is the mean of the two runs without streams, and their spread says how far to
   trust the ratio. Each run also gives the server's CPU time per request (from /proc), the
   steadier figure on a shared machine. `--split` repeats this with the README's "fastest"
   setup: ordinary requests on gunicorn (sync, 4 workers), streams on uvicorn (2 workers).

The idle streams' messages are `processing` with no worker (no qcluster runs), so nothing but
this script writes to them. The streams are opened with `starting_after=1`, so their first
event (sequence 2, `status: processing`) proves the server has started following them.

PostgreSQL: a temporary database is created next to `--postgres` (default: DATABASE_URL, or
postgres://postgres@127.0.0.1:5432/postgres) and dropped afterwards. Redis: `--redis` (default
REDIS_URL) must name an empty database, which is flushed afterwards; `--flush-redis` empties it
first. Load comes from this machine's own cores: the SSE clients (one process, asyncio) and wrk
compete with the server, as the neighbours' work does; the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_api import ServerConfig, free_port, gunicorn, manage, revision  # noqa: E402

PYTHON = sys.executable
OWNER = "bench-stream"
BACKENDS = ("sqlite", "postgres+redis", "postgres")
PHASES = ("latency", "throughput", "capacity")

# The aims of issue 3.
AIM_FAST_P50_MS = 20.0
AIM_FAST_P99_MS = 100.0
AIM_SQLITE_P99_MS = 300.0
AIM_STREAMS = 500
AIM_RATIO = 0.7

SMALL_BODY = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64})
ORDINARY = {
    "validate": ("POST", "/v1/messages/validate", SMALL_BODY),
    "models": ("GET", "/v1/models", ""),
}

# `done` prints one line we parse, rather than scraping wrk's human report. wrk counts a
# status of 400 or more in errors.status.
WRK_SCRIPT = """\
wrk.method = "{method}"
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


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# --- The agent: a process with the project's settings that writes as a worker does ------------


def agent_main() -> None:
    """Commands as JSON lines on stdin, answers as JSON lines on the original stdout (anything
    Django or a library prints goes to stderr)."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import transaction

    from messaging import jobs
    from messaging.models import MessageJob
    from messaging.serializers import check_request

    checked = check_request(
        {"model": "echo", "max_tokens": 64, "messages": [{"role": "user", "content": "bench"}]}, endpoint="sync"
    )
    last_sequence: dict[int, int] = {}

    def create(count: int) -> dict[str, Any]:
        # As POST /v1/messages stores them: `processing`, claimed (attempt 1), events 1 and 2.
        with transaction.atomic():
            created = [jobs.accept_and_claim(OWNER, checked) for _ in range(count)]
        for job in created:
            last_sequence[job.pk] = job.last_sequence
        return {"messages": [[job.message_id, job.pk] for job in created]}

    def write(pks: list[int], count: int, rate: float, seed: int) -> dict[str, Any]:
        """`count` events, one per commit, round-robin over `pks`, at Poisson intervals of mean
        1/rate (none if rate is 0). Returns [pk, sequence, commit time, call seconds] each."""
        rng = random.Random(seed)
        commits = []
        due = time.monotonic()
        for number in range(count):
            pk = pks[number % len(pks)]
            if rate:
                due += rng.expovariate(rate)
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            stamp: list[float] = []
            event = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"w{number} "}}
            started = time.monotonic()
            with transaction.atomic():
                # Registered first, so it runs right after COMMIT, before the Redis publish.
                transaction.on_commit(lambda: stamp.append(time.monotonic()))
                jobs.append_events(pk, 1, [event])
            last_sequence[pk] += 1
            commits.append([pk, last_sequence[pk], stamp[0], stamp[0] - started])
        return {"commits": commits}

    def complete(pks: list[int]) -> dict[str, Any]:
        for job in MessageJob.objects.filter(pk__in=pks).only("pk", "correlation_id"):
            jobs.complete(job, 1, None)
            last_sequence[job.pk] += 1
        return {}

    commands: dict[str, Callable[..., dict[str, Any]]] = {"create": create, "write": write, "complete": complete}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = commands[request.pop("op")](**request)
        except Exception as exc:  # reported to the orchestrator, which stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()


class Agent:
    def __init__(self, env: dict[str, str], log_path: Path):
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [PYTHON, __file__, "--agent"],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, start_new_session=True,
        )  # fmt: skip
        self._lock = threading.Lock()
        self.log_path = log_path

    def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        with self._lock:
            self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the writer process died; see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the writer process failed: {answer['error']}")
        return answer

    def create(self, count: int) -> list[tuple[str, int]]:
        return [(message_id, pk) for message_id, pk in self.call("create", count=count)["messages"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


# --- The server ----------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Children of `pid`, their children, and so on (uvicorn's workers and its
    multiprocessing helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class Uvicorn:
    """`project.asgi:application` as the README serves it."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path):
        self.port = free_port()
        self.workers = workers
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    PYTHON, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", str(workers), "--http", "httptools",
                    "--loop", "uvloop", "--timeout-graceful-shutdown", "5", "--no-access-log",
                ],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start; see {log_path}")
            time.sleep(0.1)
        # Every worker must be up, or the first measurements would include their start-up.
        while len(self.worker_pids()) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        # The workers are the processes that hold a TCP socket: uvicorn's children also include
        # multiprocessing's resource tracker.
        return [pid for pid in descendants(self.process.pid) if socket_count(pid) > 0]

    def all_pids(self) -> list[int]:
        return [self.process.pid, *descendants(self.process.pid)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything it left behind
        except ProcessLookupError:
            pass
        self.process.wait()


def socket_count(pid: int) -> int:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def status_field(pid: int, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb(pid: int) -> float:
    kilobytes = status_field(pid, "VmRSS")
    return math.nan if kilobytes is None else kilobytes / 1024


def thread_count(pid: int) -> int:
    return status_field(pid, "Threads") or 0


# --- SSE clients ---------------------------------------------------------------------------------


@dataclass
class Stream:
    message_id: str
    received: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    ended: bool = False
    ready: asyncio.Future[float] | None = None
    task: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> bool:
        return self.ended or self.error is not None


async def follow(stream: Stream, port: int, key: str, after: int) -> None:
    """Read one stream over a raw HTTP/1.1 connection, stamping each event's arrival."""
    assert stream.ready is not None
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/messages/{stream.message_id}/stream?starting_after={after} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError("the stream is not chunked")
        buffer = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                stream.ended = True
                return
            chunk = await reader.readexactly(size + 2)
            now = time.monotonic()
            buffer += chunk[:-2]
            while (end := buffer.find(b"\n\n")) >= 0:
                frame, buffer = buffer[:end], buffer[end + 2 :]
                if frame.startswith(b"id: "):
                    stream.received.append((int(frame[4 : frame.index(b"\n")]), now))
                    if not stream.ready.done():
                        stream.ready.set_result(now)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not stream.ready.done():
            stream.ready.set_exception(RuntimeError(stream.error or "the stream ended before its first event"))
        if writer is not None:
            writer.close()


class Streams:
    """Open streams, at most `parallel` connecting at a time."""

    def __init__(self, port: int, key: str, parallel: int = 64):
        self.port = port
        self.key = key
        self.open: list[Stream] = []
        self._gate = asyncio.Semaphore(parallel)

    async def add(self, message_ids: list[str], timeout: float = 60.0) -> list[str]:
        """Open a stream on each message and wait for its first event; returns the errors."""

        async def one(message_id: str) -> str | None:
            stream = Stream(message_id, ready=asyncio.get_running_loop().create_future())
            async with self._gate:
                stream.task = asyncio.create_task(follow(stream, self.port, self.key, after=1))
                self.open.append(stream)
                try:
                    await asyncio.wait_for(asyncio.shield(stream.ready), timeout)
                except TimeoutError:
                    return f"no first event within {timeout:.0f} s"
                except Exception as exc:
                    return str(exc)
            return None

        outcomes = await asyncio.gather(*(one(message_id) for message_id in message_ids))
        return [error for error in outcomes if error]

    def dropped(self) -> list[str]:
        return [stream.error or "ended" for stream in self.open if stream.dropped]

    async def close(self) -> None:
        for stream in self.open:
            if stream.task is not None:
                stream.task.cancel()
        await asyncio.gather(*(s.task for s in self.open if s.task is not None), return_exceptions=True)
        self.open = []


# --- wrk ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk_scripts(work: Path, key: str) -> dict[str, Path]:
    scripts = {}
    for name, (method, _, body) in ORDINARY.items():
        scripts[name] = work / f"{name}.lua"
        scripts[name].write_text(WRK_SCRIPT.format(method=method, key=key, body=body))
    return scripts


async def wrk(port: int, endpoint: str, script: Path, seconds: float, connections: int, pids: list[int]) -> Load:
    command = [
        "wrk", "--threads", "1", "--connections", str(connections), "--duration", f"{max(1, round(seconds))}s",
        "--timeout", "5s", "--script", str(script), f"http://127.0.0.1:{port}{ORDINARY[endpoint][1]}",
    ]  # fmt: skip
    before = cpu_seconds(pids)
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=False)
    cpu = cpu_seconds(pids) - before
    line = next((line for line in done.stdout.splitlines() if line.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    values = {name: int(value) for name, value in (item.split("=") for item in line.split()[1:])}
    errors = sum(values[name] for name in ("non2xx", "connect", "read", "write", "timeout"))
    return Load(
        requests=values["requests"],
        seconds=values["duration_us"] / 1e6,
        errors=errors,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        cpu_ms=cpu / max(values["requests"], 1) * 1000,
    )


# --- The phases ----------------------------------------------------------------------------------


@dataclass
class Latency:
    samples: list[float]
    missing: int
    commit_ms: list[float]  # the writer's append_events call, start to commit

    def summary(self) -> str:
        return (
            f"p50 {percentile(self.samples, 0.5):.1f} ms, p99 {percentile(self.samples, 0.99):.1f} ms, "
            f"max {max(self.samples, default=math.nan):.1f} ms ({len(self.samples)} deliveries, "
            f"{self.missing} missing; writer's append_events call p50 {percentile(self.commit_ms, 0.5):.1f} ms)"
        )


def delivery(streams: list[Stream], pk_of: dict[str, int], commits: list[list[Any]]) -> Latency:
    committed: dict[int, dict[int, float]] = {}
    for pk, sequence, at, _ in commits:
        committed.setdefault(pk, {})[sequence] = at
    samples, missing = [], 0
    for stream in streams:
        expected = committed.get(pk_of[stream.message_id], {})
        if not expected:
            continue
        arrived = dict(stream.received)
        for sequence, at in expected.items():
            if sequence in arrived:
                samples.append((arrived[sequence] - at) * 1000)
            else:
                missing += 1
    return Latency(samples, missing, [commit[3] * 1000 for commit in commits])


async def wait_for_deliveries(streams: list[Stream], pk_of: dict[str, int], commits: list[list[Any]], timeout: float) -> None:
    wanted: dict[int, int] = {}
    for pk, sequence, _, _ in commits:
        wanted[pk] = max(wanted.get(pk, 0), sequence)
    deadline = time.monotonic() + timeout
    relevant = [s for s in streams if pk_of[s.message_id] in wanted]
    while time.monotonic() < deadline:
        if all(s.dropped or (s.received and s.received[-1][0] >= wanted[pk_of[s.message_id]]) for s in relevant):
            return
        await asyncio.sleep(0.05)


async def latency_phase(server: Uvicorn, agent: Agent, key: str, args: argparse.Namespace) -> Latency:
    messages = await asyncio.to_thread(agent.create, args.messages)
    pk_of = dict(messages)
    pks = [pk for _, pk in messages]
    streams = Streams(server.port, key)
    try:
        errors = await streams.add([messages[n % len(messages)][0] for n in range(args.clients)])
        if errors:
            raise RuntimeError(f"{len(errors)} latency streams failed to open: {errors[:3]}")
        # One unmeasured event per message first: a process's first Redis publish imports the
        # client and connects (about 45 ms), which a worker pays once in its life.
        await asyncio.to_thread(agent.call, "write", pks=pks, count=len(pks), rate=0, seed=0)
        await asyncio.sleep(0.5)
        count = round(args.rate * args.seconds)
        commits = (await asyncio.to_thread(agent.call, "write", pks=pks, count=count, rate=args.rate, seed=1))["commits"]
        await wait_for_deliveries(streams.open, pk_of, commits, timeout=5)
        result = delivery(streams.open, pk_of, commits)
        await asyncio.to_thread(agent.call, "complete", pks=pks)
        deadline = time.monotonic() + 10
        while not all(s.dropped for s in streams.open) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = sum(not s.ended for s in streams.open)
        if unfinished:
            print(f"  WARNING: {unfinished} streams did not close after their message completed")
        return result
    finally:
        await streams.close()


@dataclass
class Level:
    streams: int
    open_errors: list[str]
    dropped: list[str]
    open_seconds: float
    idle_cpu: float  # the server's CPU seconds per second with only the streams open
    probes: dict[str, Load]
    liveness: Latency
    rss_mb: list[float]
    sockets: list[int]
    threads: list[int]

    def ok(self, p99_limit_ms: float) -> bool:
        return (
            not self.open_errors
            and not self.dropped
            and not self.liveness.missing
            and all(load.errors == 0 and load.p99_ms <= p99_limit_ms for load in self.probes.values())
        )


async def capacity_phase(server: Uvicorn, agent: Agent, key: str, args: argparse.Namespace, scripts: dict[str, Path]) -> list[Level]:
    messages = await asyncio.to_thread(agent.create, max(args.levels))
    pk_of = dict(messages)
    streams = Streams(server.port, key)
    levels: list[Level] = []
    rng = random.Random(2)
    print(
        f"  {'streams':>7}{'open s':>7}{'idle CPU':>9}{'errors':>7}{'models p50/p99 ms':>19}{'validate p50/p99 ms':>21}"
        f"{'event p50/p99 ms':>18}{'RSS MB per worker':>22}  sockets/threads per worker",
        flush=True,
    )
    try:
        for level in args.levels:
            started = time.monotonic()
            open_errors = await streams.add([message_id for message_id, _ in messages[len(streams.open) : level]])
            open_seconds = time.monotonic() - started
            # What idle streams cost by themselves: the server's CPU with nothing else to do
            # (on SQLite each web process polls its streams' messages).
            await asyncio.sleep(0.5)
            before, idle_started = cpu_seconds(server.all_pids()), time.monotonic()
            await asyncio.sleep(2)
            idle_cpu = (cpu_seconds(server.all_pids()) - before) / (time.monotonic() - idle_started)
            probes = {}
            for endpoint in ("models", "validate"):
                probes[endpoint] = await wrk(server.port, endpoint, scripts[endpoint], 2, 4, server.all_pids())
            # One event to 50 of the open streams' messages: they must all arrive.
            sample = rng.sample([pk_of[s.message_id] for s in streams.open if not s.dropped], min(50, level))
            commits = (await asyncio.to_thread(agent.call, "write", pks=sample, count=len(sample), rate=100.0, seed=level))["commits"]
            await wait_for_deliveries(streams.open, pk_of, commits, timeout=10)
            liveness = delivery(streams.open, pk_of, commits)
            workers = server.worker_pids()
            result = Level(
                streams=level,
                open_errors=open_errors,
                dropped=streams.dropped(),
                open_seconds=open_seconds,
                idle_cpu=idle_cpu,
                probes=probes,
                liveness=liveness,
                rss_mb=[rss_mb(pid) for pid in workers],
                # A worker's sockets, less its listening socket: roughly its open streams.
                sockets=[socket_count(pid) - 1 for pid in workers],
                threads=[thread_count(pid) for pid in workers],
            )
            levels.append(result)
            models, validate = probes["models"], probes["validate"]
            errors = len(open_errors) + len(result.dropped) + liveness.missing + models.errors + validate.errors
            print(
                f"  {level:>7}{open_seconds:>7.1f}{idle_cpu:>9.0%}{errors:>7}{models.p50_ms:>10.1f} /{models.p99_ms:>7.1f}"
                f"{validate.p50_ms:>12.1f} /{validate.p99_ms:>7.1f}"
                f"{percentile(liveness.samples, 0.5):>9.1f} /{percentile(liveness.samples, 0.99):>7.1f}"
                f"{' '.join(f'{mb:.0f}' for mb in result.rss_mb):>22}  "
                f"{' '.join(f'{n}/{t}' for n, t in zip(result.sockets, result.threads))}",
                flush=True,
            )
            if not result.ok(args.p99_limit):
                problems = [*open_errors, *result.dropped]
                if liveness.missing:
                    problems.append(f"{liveness.missing} of {len(sample)} events did not arrive")
                if models.errors or validate.errors:
                    problems.append(f"{models.errors + validate.errors} ordinary requests failed")
                if max(models.p99_ms, validate.p99_ms) > args.p99_limit:
                    problems.append(f"ordinary p99 over {args.p99_limit:.0f} ms")
                print(f"  level {level} failed: {'; '.join(problems[:4])}")
                break
    finally:
        await streams.close()
    return levels


@dataclass
class Throughput:
    runs: list[tuple[int, str, Load]]  # (open streams, endpoint, result)
    open_errors: list[str]
    dropped: list[str]

    def figures(self, endpoint: str) -> tuple[float, float, float, float]:
        """(baseline req/s, with streams req/s, ratio, baseline spread)."""
        without = [load.rps for streams, name, load in self.runs if name == endpoint and streams == 0]
        with_streams = [load.rps for streams, name, load in self.runs if name == endpoint and streams]
        baseline = statistics.mean(without)
        loaded = statistics.mean(with_streams)
        return baseline, loaded, loaded / baseline, (max(without) - min(without)) / baseline

    def cpu(self, endpoint: str, streams: bool) -> float:
        return statistics.mean(load.cpu_ms for n, name, load in self.runs if name == endpoint and bool(n) == streams)


async def throughput_phase(
    stream_server: Uvicorn, ordinary_port: int, ordinary_pids: Callable[[], list[int]], agent: Agent, key: str,
    args: argparse.Namespace, scripts: dict[str, Path],
) -> Throughput:
    messages = await asyncio.to_thread(agent.create, args.streams)
    streams = Streams(stream_server.port, key)
    runs: list[tuple[int, str, Load]] = []
    open_errors: list[str] = []
    dropped: list[str] = []
    try:
        for endpoint in ORDINARY:
            await wrk(ordinary_port, endpoint, scripts[endpoint], args.warmup, args.connections, [])
        for streams_open in (0, args.streams, 0):
            if streams_open:
                open_errors = await streams.add([message_id for message_id, _ in messages])
                await asyncio.sleep(1)  # let the opening's work finish before measuring
            for endpoint in ORDINARY:
                load = await wrk(ordinary_port, endpoint, scripts[endpoint], args.duration, args.connections, ordinary_pids())
                runs.append((streams_open, endpoint, load))
                print(
                    f"  {streams_open:>4} streams  {endpoint:<9}{load.rps:>7.0f} req/s  p50 {load.p50_ms:5.1f} ms"
                    f"  p99 {load.p99_ms:6.1f} ms  {load.errors} errors  {load.cpu_ms:.3f} CPU ms/req",
                    flush=True,
                )
            if streams_open:
                dropped = streams.dropped()
                await streams.close()
                await asyncio.sleep(1)
    finally:
        await streams.close()
    return Throughput(runs, open_errors, dropped)


# --- Stores ---------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="project.settings", PYTHONUNBUFFERED="1")
    env.setdefault("LOG_LEVEL", "WARNING")
    for name in ("DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)
    return env


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(server_url: str, name: str) -> Callable[[], None]:
    """Create the database `name` on the PostgreSQL server of `server_url` (from its maintenance
    database, which always exists); returns what drops it again."""
    import psycopg

    maintenance = with_database(server_url, "postgres")
    with psycopg.connect(maintenance, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(maintenance, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return drop


@contextmanager
def store(backend: str, args: argparse.Namespace, work: Path) -> Iterator[dict[str, str]]:
    """A fresh, migrated store for `backend`; its environment for the server and the writer."""
    env = base_env()
    env["DATA_DIR"] = str(work / backend.replace("+", "-"))
    cleanups: list[Callable[[], None]] = []
    try:
        if backend.startswith("postgres"):
            # Named after --postgres's database, so that parallel runs do not collide.
            prefix = urlsplit(args.postgres).path.strip("/") or "postgres"
            name = f"{prefix}_bench_stream_{os.getpid()}_{backend.replace('+', '_')}"
            cleanups.append(create_database(args.postgres, name))
            env["DATABASE_URL"] = with_database(args.postgres, name)
        if backend == "postgres+redis":
            import redis

            client = redis.Redis.from_url(args.redis)
            if args.flush_redis:
                client.flushdb()
            elif client.dbsize():
                raise SystemExit(f"Redis {args.redis} is not empty: name an empty database or pass --flush-redis")
            cleanups.append(client.flushdb)
            env["REDIS_URL"] = args.redis
        manage(env, "migrate", "--noinput")
        yield env
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:
                print(f"WARNING: cleaning up {backend} failed: {exc}")


def api_key(env: dict[str, str]) -> str:
    return manage(env, "create_api_key", "--owner", OWNER).strip().splitlines()[-1]


# --- Running --------------------------------------------------------------------------------------


def run_loop(coroutine: Any) -> Any:
    import uvloop

    return uvloop.run(coroutine)


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    label = {"sqlite": "SQLite, polling", "postgres+redis": "PostgreSQL + Redis pub/sub", "postgres": "PostgreSQL LISTEN/NOTIFY"}[backend]
    phases = [phase for phase in PHASES if phase not in args.skip]
    if backend not in args.load_backends:
        phases = [phase for phase in phases if phase == "latency"]
    if not phases:
        return results
    print(f"\n== {label} (load average {load_average()})", flush=True)
    with store(backend, args, work) as env:
        key = api_key(env)
        scripts = wrk_scripts(work, key)
        agent = Agent(env, work / f"agent-{backend}.log")
        try:
            for phase in phases:
                log = work / f"uvicorn-{backend}-{phase}.log"
                workers = args.stream_workers if phase == "throughput" and args.split else args.web_workers
                if phase == "latency":
                    print(
                        f"-- latency: {args.clients} clients on {args.messages} messages, {args.rate:g} events/s "
                        f"for {args.seconds:g} s, uvicorn {workers} workers",
                        flush=True,
                    )
                    server = Uvicorn(env, workers, log)
                    try:
                        results["latency"] = run_loop(latency_phase(server, agent, key, args))
                    finally:
                        server.stop()
                    print(f"  {results['latency'].summary()}", flush=True)
                elif phase == "throughput":
                    print(
                        f"-- throughput: wrk 1 thread, {args.connections} connections, {args.duration:g} s per run, "
                        f"uvicorn {args.web_workers} workers; none, {args.streams} open streams, none",
                        flush=True,
                    )
                    server = Uvicorn(env, args.web_workers, log)
                    try:
                        results["throughput"] = run_loop(
                            throughput_phase(server, server.port, server.all_pids, agent, key, args, scripts)
                        )
                    finally:
                        server.stop()
                    if args.split:
                        print(
                            f"-- throughput, split: ordinary requests on gunicorn sync {args.gunicorn_workers} workers, "
                            f"streams on uvicorn {args.stream_workers} workers",
                            flush=True,
                        )
                        server = Uvicorn(env, args.stream_workers, work / f"uvicorn-{backend}-split.log")
                        try:
                            config = ServerConfig("sync", args.gunicorn_workers)
                            with gunicorn(config, env, work / f"gunicorn-{backend}.log") as ordinary:
                                results["split"] = run_loop(
                                    throughput_phase(
                                        server, ordinary.port, lambda: [ordinary.pid, *descendants(ordinary.pid)],
                                        agent, key, args, scripts,
                                    )
                                )
                        finally:
                            server.stop()
                elif phase == "capacity":
                    print(f"-- capacity: idle streams in steps, uvicorn {args.web_workers} workers", flush=True)
                    server = Uvicorn(env, args.web_workers, log)
                    try:
                        results["capacity"] = run_loop(capacity_phase(server, agent, key, args, scripts))
                    finally:
                        server.stop()
        finally:
            agent.stop()
    return results


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str, str]] = []
    for backend, p50_aim, p99_aim in (
        ("sqlite", None, AIM_SQLITE_P99_MS),
        ("postgres+redis", AIM_FAST_P50_MS, AIM_FAST_P99_MS),
        ("postgres", AIM_FAST_P50_MS, AIM_FAST_P99_MS),
    ):
        latency: Latency | None = results.get(backend, {}).get("latency")
        if latency is None:
            continue
        p50, p99 = percentile(latency.samples, 0.5), percentile(latency.samples, 0.99)
        ok = p99 <= p99_aim and (p50_aim is None or p50 <= p50_aim) and not latency.missing
        rows.append((
            f"delivery latency ms, {backend}",
            f"p50 {p50:.1f}, p99 {p99:.1f}, max {max(latency.samples, default=math.nan):.0f}"
            + (f", {latency.missing} lost" if latency.missing else ""),
            (f"p50 <= {p50_aim:.0f}, " if p50_aim else "") + f"p99 <= {p99_aim:.0f}",
            verdict(ok),
        ))  # fmt: skip
    for backend in BACKENDS:
        levels: list[Level] | None = results.get(backend, {}).get("capacity")
        if not levels:
            continue
        held = [level for level in levels if level.ok(args.p99_limit)]
        best = held[-1].streams if held else 0
        failed = "" if levels[-1].ok(args.p99_limit) else f", {levels[-1].streams} failed"
        rows.append((
            f"open streams held, {backend}",
            f"{best} (of {levels[-1].streams} tried{failed})",
            f">= {AIM_STREAMS}, no error",
            verdict(best >= AIM_STREAMS),
        ))  # fmt: skip
        if held:
            probes = held[-1].probes
            rows.append((
                f"  ordinary p99 ms at {best} streams",
                f"models {probes['models'].p99_ms:.0f}, validate {probes['validate'].p99_ms:.0f}", "", "",
            ))  # fmt: skip
    for backend in BACKENDS:
        for kind, where in (("throughput", "uvicorn"), ("split", "split: gunicorn")):
            throughput: Throughput | None = results.get(backend, {}).get(kind)
            if throughput is None:
                continue
            clean = not throughput.open_errors and not throughput.dropped and all(load.errors == 0 for _, _, load in throughput.runs)
            for endpoint in ORDINARY:
                baseline, loaded, ratio, spread = throughput.figures(endpoint)
                cpu = throughput.cpu(endpoint, streams=False) / throughput.cpu(endpoint, streams=True)
                rows.append((
                    f"{endpoint} req/s {args.streams} streams vs 0, {backend}, {where}",
                    f"{loaded:.0f}/{baseline:.0f} = {ratio:.2f} (spread {spread:.0%}; CPU {cpu:.2f})",
                    f">= {AIM_RATIO}, no error",
                    verdict(ratio >= AIM_RATIO and clean),
                ))  # fmt: skip
            if not clean:
                rows.append((
                    f"  errors, {backend}, {where}",
                    f"{len(throughput.open_errors)} not opened, {len(throughput.dropped)} dropped, "
                    f"{sum(load.errors for _, _, load in throughput.runs)} requests", "", "",
                ))  # fmt: skip
    if not rows:
        return
    widths = [max(len(row[column]) for row in [("figure", "measured", "aim", ""), *rows]) for column in range(3)]
    print()
    for row in [("figure", "measured", "aim", ""), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    if any("throughput" in figures or "split" in figures for figures in results.values()):
        print(
            "(throughput: with streams / mean of the two runs without; spread: of those two runs; CPU: the "
            "server's CPU per request without streams / with, 1.00 = idle streams cost nothing)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="stores to measure (all)")
    parser.add_argument(
        "--load-backends", nargs="+", choices=BACKENDS, default=["sqlite", "postgres+redis"],
        help="stores on which capacity and throughput are measured too (sqlite postgres+redis)",
    )  # fmt: skip
    parser.add_argument("--skip", nargs="+", choices=PHASES, default=[], help="phases to leave out")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn workers (2, as scripts/serve)")
    parser.add_argument("--clients", type=int, default=20, help="latency: SSE clients (20)")
    parser.add_argument("--messages", type=int, default=5, help="latency: messages written, clients spread over them (5)")
    parser.add_argument("--rate", type=float, default=40.0, help="latency: events a second, all messages together (40)")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency: seconds of writing (10)")
    parser.add_argument("--levels", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000], help="capacity: open streams at each step")
    parser.add_argument(
        "--p99-limit", type=float, default=1000.0,
        help="capacity: a step fails if an ordinary probe's p99 exceeds this many ms (1000)",
    )  # fmt: skip
    parser.add_argument("--streams", type=int, default=AIM_STREAMS, help="throughput: open streams (500)")
    parser.add_argument("--duration", type=float, default=8.0, help="throughput: seconds per wrk run (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="throughput: seconds of unmeasured load first (2)")
    parser.add_argument("--connections", type=int, default=32, help="throughput: wrk connections (32)")
    parser.add_argument("--split", action="store_true", help="throughput also with gunicorn for ordinary requests")
    parser.add_argument("--gunicorn-workers", type=int, default=4, help="--split: gunicorn sync workers (4)")
    parser.add_argument("--stream-workers", type=int, default=2, help="--split: uvicorn workers for streams (2)")
    parser.add_argument(
        "--postgres", default=os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server to create temporary databases on (DATABASE_URL)",
    )  # fmt: skip
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0", help="an empty Redis database (REDIS_URL)")
    parser.add_argument("--flush-redis", action="store_true", help="empty the Redis database first")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, SQLite databases)")
    args = parser.parse_args()
    if args.agent:
        agent_main()
        return
    if shutil.which("wrk") is None and set(args.skip) != {"throughput", "capacity"}:
        sys.exit("wrk is not installed (apt-get install wrk)")
    args.levels = sorted(set(args.levels))

    # Every stream is a socket here and one in the server (which inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max(args.levels + [args.streams]) + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(hard, needed), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        print(f"WARNING: only {soft} file descriptors (ulimit -n); capacity above {soft // 2 - 500} streams will fail")

    # SIGTERM as Ctrl-C, so that every server started is stopped on the way out (and SIGINT
    # even when a shell started us in the background, which ignores it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    started = time.monotonic()
    print(f"{datetime.now():%Y-%m-%d %H:%M}, commit {revision()}, {os.cpu_count()} cores, load average {load_average()}")
    print(f"MESSAGING_POLL_INTERVAL={os.environ.get('MESSAGING_POLL_INTERVAL', '0.05 (default)')}; work directory {work}")
    results: dict[str, dict[str, Any]] = {}
    try:
        for backend in BACKENDS:
            if backend in args.backends:
                results[backend] = run_backend(backend, args, work)
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average after: {load_average()}; {time.monotonic() - started:.0f} s in all")
    report(results, args)


if __name__ == "__main__":
    main()
