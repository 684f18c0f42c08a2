"""Messages in flight at once: how fast a backlog drains, what an in-flight message costs, and
how many synchronous streams the web server holds (issue 8).

    .venv/bin/python bench/bench_concurrency.py              # N=1000, 16/128/512 streams
    .venv/bin/python bench/bench_concurrency.py --quick      # N=100, 16/64 streams, under a minute
    .venv/bin/python bench/bench_concurrency.py --postgres   # PostgreSQL + Redis instead of SQLite

One run, the default setup as `scripts/serve` starts it: uvicorn (`project.asgi:application`,
httptools, uvloop, `--web-workers` 2) and one `manage.py qcluster` (MESSAGING_WORKERS 2), on a
fresh SQLite database with django-q2's ORM broker in a temporary DATA_DIR, or with `--postgres`
on a temporary PostgreSQL database (created on `--postgres-url`, dropped afterwards) and an
empty Redis database (`--redis-url`, flushed afterwards). The model is `tests.latency_upstream`
in a process of its own: every answer's first word comes `--latency` seconds (2) after the
request, then `--words` words `--interval` apart; it counts the requests in flight.

1. Drain: `--messages` (1,000) POST /v1/messages/async with `stream: true` (every token delta
   recorded), 32 submitting at once, after a warm-up of a few messages (so start-up imports do
   not count as in-flight memory). Drain time = the last message's `finished_at` minus the first
   submission, against the ideal `latency x ceil(N / slots)`, slots = MESSAGING_WORKERS x
   MESSAGING_CONCURRENCY as the service's settings say (1 per process before the runner).
   Sampled every 0.1 s: the upstream's requests in flight (its peak), the RSS of every qcluster
   process (RSS per in-flight message = (RSS at the busiest sample - RSS idle) / in flight then),
   and the database connections open (PostgreSQL: pg_stat_activity of the bench database;
   SQLite: file descriptors on db.sqlite3 across the service's processes, one per connection).
2. Today's design in the same run: a new qcluster with MESSAGING_CONCURRENCY=1 drains
   `--legacy-messages` (40), and the time 1,000 would take is scaled from its rate.
3. The synchronous endpoint: at each `--levels` concurrency (16, 128, 512), first that many
   direct calls to the upstream at once (its own time to first word at that load), then that
   many clients each sending `--rounds` (3) POST /v1/messages `stream: true` one after the other.
   Throughput = completed requests / seconds; time to first token added = the service's
   percentile of (request sent -> first content_block_delta) minus the direct calls' (request
   sent -> first content chunk). Beside them a probe asks GET /healthz and GET /v1/models every
   50 ms (p99). Clients are raw asyncio sockets on uvloop in this one process, a connection per
   request.

Nothing decides an outcome by sleeping: the script waits for states (no message pending or
processing) under deadlines that fail loudly. Everything started is stopped on the way out,
on errors, Ctrl-C and SIGTERM too. Exit status 1 if any message or request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_api import manage, revision, stop_process, store_description
from bench.bench_stream import (
    Uvicorn,
    create_database,
    descendants,
    load_average,
    percentile,
    run_loop,
    status_field,
    with_database,
)

PYTHON = sys.executable
OWNER = "bench-concurrency"
SUBMITTERS = 32
SAMPLE_EVERY = 0.1
# Database connections by the service's process trees ("web", "qcluster"): by role where the
# store can tell (SQLite), else {"all": n}.
Connections = Callable[[dict[str, list[int]]], dict[str, int]]
PROMPT = [{"role": "user", "content": "Say hello in a few words."}]


# --- Processes ----------------------------------------------------------------------------------


@contextmanager
def latency_upstream(args: argparse.Namespace, log_path: Path) -> Iterator[int]:
    command = [
        PYTHON, "-m", "tests.latency_upstream", "--port", "0", "--latency", str(args.latency),
        "--words", str(args.words), "--interval", str(args.interval),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "port N", or nothing if it died
        if not line.startswith("port "):
            raise RuntimeError(f"the latency upstream did not start; see {log_path}")
        yield int(line.split()[1])
    finally:
        stop_process(process, timeout=5)


@contextmanager
def qcluster(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [PYTHON, "manage.py", "qcluster"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop_process(process, timeout=30)


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def rss_kb(pids: list[int]) -> int:
    return sum(status_field(pid, "VmRSS") or 0 for pid in pids)


def open_on(path: str, pids: list[int]) -> int:
    """File descriptors open on `path` across `pids`: one per SQLite connection."""
    count = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}") == path
            except OSError:
                pass
    return count


# --- Store ----------------------------------------------------------------------------------------


@contextmanager
def store(args: argparse.Namespace, work: Path) -> Iterator[tuple[dict[str, str], Connections]]:
    """A fresh, migrated store; its environment, and a function counting its open connections
    by the service's process trees (blocking: call it off the event loop)."""
    env = dict(os.environ, DATA_DIR=str(work / "data"), PYTHONUNBUFFERED="1", DJANGO_SETTINGS_MODULE="project.settings")
    env.setdefault("LOG_LEVEL", "WARNING")
    for name in ("DATABASE_URL", "REDIS_URL", "MESSAGING_CONCURRENCY"):
        env.pop(name, None)
    with ExitStack() as cleanups:
        if not args.postgres:
            manage(env, "migrate", "--noinput")
            path = str(work / "data" / "db.sqlite3")
            yield env, lambda processes: {role: open_on(path, pids) for role, pids in processes.items()}
            return
        import psycopg
        import redis

        name = f"bench_concurrency_{os.getpid()}"
        cleanups.callback(create_database(args.postgres_url, name))
        maintenance = with_database(args.postgres_url, "postgres")
        client = redis.Redis.from_url(args.redis_url)
        if args.flush_redis:
            client.flushdb()
        elif client.dbsize():
            raise SystemExit(f"Redis {args.redis_url} is not empty: name an empty database or pass --flush-redis")
        cleanups.callback(client.flushdb)
        env.update(DATABASE_URL=with_database(args.postgres_url, name), REDIS_URL=args.redis_url)
        manage(env, "migrate", "--noinput")
        watcher = cleanups.enter_context(psycopg.connect(maintenance, autocommit=True))

        def connections(processes: dict[str, list[int]]) -> dict[str, int]:
            # A backend's pid is the server's, not the client's: counted together.
            row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [name]).fetchone()
            return {"all": int(row[0]) if row else 0}

        yield env, connections


def service_settings(env: dict[str, str]) -> tuple[int, int]:
    """MESSAGING_WORKERS and MESSAGING_CONCURRENCY as the service reads them (1: the code before
    the runner, one message per process)."""
    code = "from django.conf import settings as s; print(s.MESSAGING_WORKERS, getattr(s, 'MESSAGING_CONCURRENCY', 1))"
    workers, concurrency = manage(env, "shell", "--no-imports", "-c", code).split()
    return int(workers), int(concurrency)


# --- Sampling -------------------------------------------------------------------------------------


@dataclass
class Sample:
    in_flight: int
    rss_kb: int
    connections: dict[str, int]


class Sampler:
    """Every SAMPLE_EVERY seconds: the upstream's requests in flight, the qcluster's RSS, the
    database connections. `processes()` names the service's process trees ("web", "qcluster")."""

    def __init__(self, upstream: httpx.AsyncClient, processes: Callable[[], dict[str, list[int]]], connections: Connections):
        self.upstream, self.processes, self.connections = upstream, processes, connections
        self.samples: list[Sample] = []

    async def run(self) -> None:
        while True:
            stats = (await self.upstream.get("/stats")).json()
            processes = self.processes()
            connections = await asyncio.to_thread(self.connections, processes)
            self.samples.append(Sample(stats["current"], rss_kb(processes["qcluster"]), connections))
            await asyncio.sleep(SAMPLE_EVERY)

    def busiest(self) -> Sample:
        return max(self.samples, key=lambda sample: (sample.in_flight, sample.rss_kb))

    def max_connections(self) -> str:
        """The most seen at once, and by role at their own peaks."""
        most = max(sum(sample.connections.values()) for sample in self.samples)
        roles = self.samples[0].connections
        if len(roles) == 1:
            return str(most)
        return f"{most} ({', '.join(f'{role} {max(s.connections[role] for s in self.samples)}' for role in roles)})"


@contextmanager
def sampling(sampler: Sampler) -> Iterator[Sampler]:
    sampler.samples = []
    task = asyncio.ensure_future(sampler.run())
    try:
        yield sampler
    finally:
        if task.done():
            task.result()  # the sampler's own failure, loudly
        task.cancel()


# --- The drain ------------------------------------------------------------------------------------


@dataclass
class Drain:
    label: str
    messages: int
    slots: int
    latency: float
    submit_seconds: float
    seconds: float
    statuses: Counter[str]
    retried: int
    peak: int
    rss_idle_kb: int
    busiest: Sample
    connections: str

    @property
    def ideal(self) -> float:
        return self.latency * math.ceil(self.messages / self.slots)

    @property
    def rss_per_message_kb(self) -> float:
        return (self.busiest.rss_kb - self.rss_idle_kb) / self.busiest.in_flight if self.busiest.in_flight else math.nan

    @property
    def cluster_per_message_mb(self) -> float:
        """The whole cluster over what it holds in flight: the cost of a slot, idle or not."""
        return self.busiest.rss_kb / 1024 / self.busiest.in_flight if self.busiest.in_flight else math.nan

    @property
    def failed(self) -> int:
        return self.messages - self.statuses["completed"]


class Api:
    def __init__(self, port: int, key: str):
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60,
            limits=httpx.Limits(max_connections=SUBMITTERS + 4),
        )  # fmt: skip

    async def submit(self, correlation_id: str) -> None:
        body = {"model": "upstream", "stream": True, "max_tokens": 64, "messages": PROMPT, "correlation_id": correlation_id}
        response = await self.client.post("/v1/messages/async", json=body)
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/messages/async answered {response.status_code}: {response.text[:300]}")

    async def any_with(self, correlation_id: str, status: str) -> bool:
        response = await self.client.get("/v1/messages", params={"correlation_id": correlation_id, "status": status, "limit": 1})
        response.raise_for_status()
        return bool(response.json()["data"])

    async def every(self, correlation_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"correlation_id": correlation_id, "limit": 100}
        while True:
            response = await self.client.get("/v1/messages", params=params)
            response.raise_for_status()
            page = response.json()
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after_id"] = page["last_id"]


async def wait_drained(api: Api, correlation_id: str, timeout: float) -> None:
    """Until none is pending or processing. Pending is asked first: a status only moves forward,
    so a message not pending then and not processing after is finished."""
    deadline = time.monotonic() + timeout
    while await api.any_with(correlation_id, "pending") or await api.any_with(correlation_id, "processing"):
        if time.monotonic() > deadline:
            statuses = Counter(message["status"] for message in await api.every(correlation_id))
            raise RuntimeError(f"{correlation_id}: not drained after {timeout:.0f} s: {dict(statuses)}")
        await asyncio.sleep(0.2)


async def submit_all(api: Api, correlation_id: str, count: int) -> None:
    gate = asyncio.Semaphore(SUBMITTERS)

    async def one() -> None:
        async with gate:
            await api.submit(correlation_id)

    await asyncio.gather(*(one() for _ in range(count)))


async def drain(
    label: str, count: int, slots: int, api: Api, upstream: httpx.AsyncClient, sampler: Sampler, args: argparse.Namespace
) -> Drain:
    # Warm-up: every worker process imports and connects what a message needs, before "idle".
    await submit_all(api, f"{label}-warmup", 2 * args.workers)
    await wait_drained(api, f"{label}-warmup", timeout=120)
    warmed = Counter(message["status"] for message in await api.every(f"{label}-warmup"))
    if set(warmed) != {"completed"}:
        raise RuntimeError(f"warm-up messages did not complete: {dict(warmed)}; see the qcluster log")
    rss_idle = rss_kb(sampler.processes()["qcluster"])
    await upstream.post("/reset")
    # Before the runner, 2 slots: allow today's time for this N, and then some.
    timeout = args.latency * count / args.workers * 1.5 + 120
    with sampling(sampler):
        started_wall, started = time.time(), time.monotonic()
        await submit_all(api, label, count)
        submit_seconds = time.monotonic() - started
        await wait_drained(api, label, timeout)
    messages = await api.every(label)
    last = max(datetime.fromisoformat(message["finished_at"]).timestamp() for message in messages if message["finished_at"])
    return Drain(
        label=label, messages=count, slots=slots, latency=args.latency, submit_seconds=submit_seconds,
        seconds=last - started_wall, statuses=Counter(message["status"] for message in messages),
        retried=sum(message["attempts"] > 1 for message in messages), peak=(await upstream.get("/stats")).json()["peak"],
        rss_idle_kb=rss_idle, busiest=sampler.busiest(), connections=sampler.max_connections(),
    )  # fmt: skip


async def backlog(count: int, slots: int, api: Api, upstream: httpx.AsyncClient, args: argparse.Namespace, start: Callable[[], Any]) -> tuple[float, int, Counter[str]]:
    """A backlog queued while no worker runs, then drained: the runners' own pace, without the
    admission of new messages competing for the same two cores. Seconds from the first start
    to the last finish, the upstream's peak, the statuses."""
    await submit_all(api, "backlog", count)
    await upstream.post("/reset")
    with start():
        await wait_drained(api, "backlog", timeout=args.latency * count / args.workers * 1.5 + 120)
    messages = await api.every("backlog")
    first = min(datetime.fromisoformat(message["started_at"]).timestamp() for message in messages if message["started_at"])
    last = max(datetime.fromisoformat(message["finished_at"]).timestamp() for message in messages if message["finished_at"])
    return last - first, (await upstream.get("/stats")).json()["peak"], Counter(message["status"] for message in messages)


def print_drain(result: Drain, scale_to: int | None = None) -> None:
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(result.statuses.items()))
    print(f"  {result.messages} messages ({statuses}; {result.retried} retried), submitted in {result.submit_seconds:.1f} s")
    print(
        f"  drained in {result.seconds:.1f} s; ideal {result.latency:g} s x ceil({result.messages} / {result.slots} slots) "
        f"= {result.ideal:.0f} s; ratio {result.seconds / result.ideal:.2f}"
    )
    if scale_to:
        print(f"  at this rate {scale_to} messages would take {result.seconds * scale_to / result.messages:.0f} s")
    print(f"  peak in flight (upstream): {result.peak}")
    busiest = result.busiest
    print(
        f"  qcluster RSS: {result.rss_idle_kb / 1024:.0f} MB idle, {busiest.rss_kb / 1024:.0f} MB with {busiest.in_flight} in flight: "
        f"{result.rss_per_message_kb:.0f} KB more per in-flight message; "
        f"{result.cluster_per_message_mb:.1f} MB of cluster per message in flight"
    )
    print(f"  database connections open: at most {result.connections}", flush=True)


# --- The synchronous endpoint ---------------------------------------------------------------------


class Failed(Exception):
    pass


async def timed_stream(port: int, request: bytes, is_first: Callable[[bytes], bool], is_last: Callable[[bytes], bool]) -> float:
    """Seconds from sending `request` to the first SSE frame that `is_first` accepts; the
    response is read to its end, which must hold a frame `is_last` accepts."""
    started = time.monotonic()
    first_at = None
    ended = False
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise Failed(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        if b"transfer-encoding: chunked" not in head.lower():
            raise Failed("the answer is not chunked")
        buffer = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            buffer += (await reader.readexactly(size + 2))[:-2]
            *frames, buffer = buffer.split(b"\n\n")
            if first_at is None and any(is_first(frame) for frame in frames):
                first_at = time.monotonic()
            ended = ended or any(is_last(frame) for frame in frames)
    finally:
        writer.close()
    if first_at is None or not ended:
        raise Failed("the stream ended early")
    return first_at - started


def http_post(port: int, path: str, body: dict[str, Any], key: str = "") -> bytes:
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


def has_content(frame: bytes) -> bool:
    if not frame.startswith(b"data: {"):
        return False
    choices = json.loads(frame[6:])["choices"]
    return bool(choices and choices[0]["delta"].get("content"))


@dataclass
class Level:
    concurrency: int
    direct: list[float]
    ttft: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = math.nan
    peak: int = 0
    probes: list[float] = field(default_factory=list)
    probe_errors: int = 0
    connections: str = ""

    def added(self, fraction: float) -> float:
        return (percentile(self.ttft, fraction) - percentile(self.direct, fraction)) * 1000


async def probe(port: int, key: str, level: Level) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        while True:
            for path in ("/healthz", "/v1/models"):
                started = time.monotonic()
                try:
                    ok = (await client.get(path)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                level.probes.append(time.monotonic() - started)
                level.probe_errors += not ok
                await asyncio.sleep(0.05)


async def sync_level(
    concurrency: int,
    port: int,
    upstream_port: int,
    key: str,
    upstream: httpx.AsyncClient,
    sampler: Sampler,
    args: argparse.Namespace,
) -> Level:
    direct_request = http_post(upstream_port, "/v1/chat/completions", {"model": "m", "stream": True, "messages": PROMPT})
    direct = await asyncio.gather(
        *(timed_stream(upstream_port, direct_request, has_content, lambda f: f == b"data: [DONE]") for _ in range(concurrency))
    )
    level = Level(concurrency, list(direct))
    service_request = http_post(
        port, "/v1/messages", {"model": "upstream", "stream": True, "max_tokens": 64, "messages": PROMPT}, key
    )

    def is_delta(frame: bytes) -> bool:
        return b"event: content_block_delta" in frame

    def is_completed(frame: bytes) -> bool:
        return b"event: status" in frame and b'"completed"' in frame

    async def client() -> None:
        for _ in range(args.rounds):
            try:
                level.ttft.append(
                    await asyncio.wait_for(timed_stream(port, service_request, is_delta, is_completed), args.request_timeout)
                )
            except (Failed, OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                level.errors[str(exc) or type(exc).__name__] += 1

    await upstream.post("/reset")
    prober = asyncio.ensure_future(probe(port, key, level))
    try:
        with sampling(sampler):
            started = time.monotonic()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            level.seconds = time.monotonic() - started
    finally:
        prober.cancel()
    level.peak = (await upstream.get("/stats")).json()["peak"]
    level.connections = sampler.max_connections()
    return level


def print_levels(levels: list[Level]) -> None:
    print(
        f"\n  {'streams':>7} {'req/s':>7} {'ok':>6} {'errors':>6} {'peak':>5} {'direct p50':>10} {'added p50':>9} "
        f"{'added p99':>9} {'probe p99':>9}  db connections"
    )
    for level in levels:
        ok = len(level.ttft)
        print(
            f"  {level.concurrency:>7} {ok / level.seconds:>7.1f} {ok:>6} {sum(level.errors.values()) + level.probe_errors:>6} "
            f"{level.peak:>5} {percentile(level.direct, 0.5) * 1000:>8.0f}ms {level.added(0.5):>7.0f}ms {level.added(0.99):>7.0f}ms "
            f"{percentile(level.probes, 0.99) * 1000:>7.0f}ms  {level.connections}"
        )
        for error, count in level.errors.most_common(3):
            print(f"          {count} x {error}")


# --- Running --------------------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, env: dict[str, str], connections: Connections, work: Path, upstream_port: int, key: str
) -> bool:
    upstream = httpx.AsyncClient(base_url=f"http://127.0.0.1:{upstream_port}", timeout=10)
    server = Uvicorn(env, args.web_workers, work / "uvicorn.log")
    api = Api(server.port, key)
    drains: list[Drain] = []
    levels: list[Level] = []
    drains_failed = False
    try:
        workers, concurrency = service_settings(env)
        with qcluster(env, work / "qcluster.log") as cluster:
            sampler = Sampler(upstream, lambda: {"web": server.all_pids(), "qcluster": tree(cluster.pid)}, connections)
            if args.messages:
                slots = f"MESSAGING_WORKERS={workers}, MESSAGING_CONCURRENCY={concurrency} ({workers * concurrency} slots)"
                print(f"\n-- drain: {slots}", flush=True)
                drains.append(await drain("drain", args.messages, workers * concurrency, api, upstream, sampler, args))
                print_drain(drains[-1])
            if args.levels:
                print(
                    f"\n-- synchronous POST /v1/messages stream:true, uvicorn {args.web_workers} workers, {args.rounds} requests per client",
                    flush=True,
                )
                for level in args.levels:
                    levels.append(await sync_level(level, server.port, upstream_port, key, upstream, sampler, args))
                    print(f"  {level} streams: done in {levels[-1].seconds:.1f} s", flush=True)
                print_levels(levels)
        if args.messages:
            print(f"\n-- backlog: {args.messages} messages queued first, then a new qcluster drains them", flush=True)
            seconds, peak, statuses = await backlog(
                args.messages, workers * concurrency, api, upstream, args, lambda: qcluster(env, work / "qcluster-backlog.log")
            )
            ideal = args.latency * math.ceil(args.messages / (workers * concurrency))
            print(f"  drained in {seconds:.1f} s from the first start; ideal {ideal:.0f} s; ratio {seconds / ideal:.2f}; peak in flight {peak}")
            print(f"  {', '.join(f'{number} {status}' for status, number in sorted(statuses.items()))}", flush=True)
            if set(statuses) != {"completed"}:
                drains_failed = True
        if args.legacy_messages:
            legacy_env = dict(env, MESSAGING_CONCURRENCY="1")
            print(f"\n-- today's design: MESSAGING_CONCURRENCY=1 ({workers} slots)", flush=True)
            with qcluster(legacy_env, work / "qcluster-legacy.log") as legacy:
                sampler = Sampler(upstream, lambda: {"web": server.all_pids(), "qcluster": tree(legacy.pid)}, connections)
                drains.append(await drain("legacy", args.legacy_messages, workers, api, upstream, sampler, args))
                print_drain(drains[-1], scale_to=args.messages)
    finally:
        await api.client.aclose()
        await upstream.aclose()
        server.stop()
    failed = drains_failed or any(result.failed for result in drains)
    return not failed and not any(level.errors or level.probe_errors for level in levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 messages, 20 legacy, streams 16 and 64, 2 rounds")
    parser.add_argument("--messages", type=int, help="messages drained (1000); 0 skips the drain")
    parser.add_argument("--legacy-messages", type=int, help="messages drained with MESSAGING_CONCURRENCY=1 (40); 0 skips it")
    parser.add_argument("--levels", type=int, nargs="*", help="concurrent synchronous streams (16 128 512); none skips them")
    parser.add_argument("--rounds", type=int, help="synchronous requests per client, one after the other (3)")
    parser.add_argument("--latency", type=float, default=2.0, help="upstream: seconds to the first word (2)")
    parser.add_argument("--words", type=int, default=5, help="upstream: words per answer (5)")
    parser.add_argument("--interval", type=float, default=0.0, help="upstream: seconds between words (0)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a synchronous request may take (300)")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn workers (2, as scripts/serve)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL + Redis instead of SQLite + the ORM broker")
    parser.add_argument(
        "--postgres-url", default="postgres://postgres@127.0.0.1:5432/postgres", help="server for the temporary database"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="an empty Redis database, flushed afterwards")
    parser.add_argument("--flush-redis", action="store_true", help="empty the Redis database first")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, SQLite database)")
    args = parser.parse_args()
    quick = args.quick
    args.messages = (100 if quick else 1000) if args.messages is None else args.messages
    args.legacy_messages = (20 if quick else 40) if args.legacy_messages is None else args.legacy_messages
    args.levels = ([16, 64] if quick else [16, 128, 512]) if args.levels is None else args.levels
    args.rounds = args.rounds or (2 if quick else 3)

    # Every stream is a socket here, one in uvicorn, and one to the upstream (children inherit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * max([*args.levels, SUBMITTERS]) + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(hard, needed), hard))
    # SIGTERM as Ctrl-C, so that everything started is stopped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    started = time.monotonic()
    ok = False
    try:
        with store(args, work) as (env, connections), latency_upstream(args, work / "upstream.log") as upstream_port:
            args.workers = int(env.get("MESSAGING_WORKERS", "2"))
            models = work / "models.toml"
            models.write_text(
                f'[models.upstream]\nprovider = "openai"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
                f"max_tokens = 1024\nmax_attempts = 1\nread_timeout = {max(30.0, 3 * (args.latency + args.interval))}\n"
            )
            env["MESSAGING_MODELS_FILE"] = str(models)
            key = manage(env, "create_api_key", "--owner", OWNER).strip().splitlines()[-1]
            print(f"{datetime.now():%Y-%m-%d %H:%M}, commit {revision()}, {os.cpu_count()} cores, load average {load_average()}")
            print(store_description(env))
            print(
                f"upstream: first word after {args.latency:g} s, {args.words} words {args.interval:g} s apart; "
                f"uvicorn {args.web_workers} workers; work directory {work}",
                flush=True,
            )
            ok = run_loop(measure(args, env, connections, work, upstream_port, key))
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        if args.keep or not ok:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average after: {load_average()}; {time.monotonic() - started:.0f} s in all")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
