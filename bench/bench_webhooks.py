"""Webhook delivery: how soon an event reaches its receiver after the message finished, and
what queuing it costs the message's completion.

    python bench/bench_webhooks.py                 # 100 messages, about 30 s
    python bench/bench_webhooks.py --messages 300

1. Delivery latency. A real `manage.py qcluster` (2 worker processes) runs on a fresh SQLite
   database; a receiver (a threaded HTTP server in this process) answers 200 and notes when
   each event arrived. Messages (`echo`) of an owner with an endpoint run one at a time; the
   latency is the arrival time minus the message's `finished_at` (one clock).
2. What it costs completion. The transaction that ends a message also writes its outbox rows:
   the ending write (`jobs.record` of a finished message, as a runner's flush does it) is
   timed for an owner with an endpoint and for one without, alternately, in this process with
   the cluster stopped, and the two compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORK = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
ENV = {
    **os.environ,
    "DJANGO_SETTINGS_MODULE": "project.settings",
    "DATA_DIR": str(WORK),
    "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-webhooks-" + "x" * 40),
    "MESSAGING_MCP_ALLOW_PRIVATE": "true",  # the receiver is on loopback
    "MESSAGING_WORKERS": "2",
}
os.environ.update(ENV)

import django  # noqa: E402

django.setup()

from bench.bench_api import revision, stop_process  # noqa: E402
from bench.bench_stream import percentile  # noqa: E402
from messaging import jobs  # noqa: E402
from messaging.models import MessageJob, Status, WebhookDelivery, WebhookEndpoint  # noqa: E402
from messaging.serializers import check_request  # noqa: E402

arrivals: dict[str, float] = {}


class Receiver(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        arrivals.setdefault(json.loads(body)["data"]["message_id"], time.time())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.002)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=ENV, check=True)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    WebhookEndpoint.objects.create(owner="hooked", url=f"http://127.0.0.1:{receiver.server_port}/hooks")
    cluster = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checked = check_request({"messages": [{"role": "user", "content": "tell me when you are done"}]}, endpoint="async")
    latency: list[float] = []
    try:
        for number in range(args.warmup + args.messages):
            job, _ = jobs.accept("hooked", checked)
            finished = wait_for(lambda: MessageJob.objects.filter(pk=job.pk, finished_at__isnull=False).values_list("finished_at", flat=True).first())
            arrived = wait_for(lambda: arrivals.get(job.message_id))
            # Its attempt recorded too, so that no write of it overlaps the next message.
            wait_for(lambda: WebhookDelivery.objects.filter(job_id=job.pk, status="delivered").first())
            if number >= args.warmup:
                latency.append(arrived - finished.timestamp())
    finally:
        stop_process(cluster, 20)
        receiver.shutdown()

    ending: dict[str, list[float]] = {"hooked": [], "plain": []}
    for number in range(args.warmup + args.messages):
        for owner in ("hooked", "plain"):
            jobs.accept(owner, checked)
            claimed = jobs.claim_next()
            assert claimed is not None and claimed.owner == owner
            write = jobs.Write(claimed.pk, claimed.attempts, [], jobs.End(Status.COMPLETED, result=None))
            started = time.perf_counter()
            assert not jobs.record([write])
            if number >= args.warmup:
                ending[owner].append(time.perf_counter() - started)

    ms = lambda values, q: percentile(values, q) * 1000  # noqa: E731
    print(f"bench_webhooks: {args.messages} messages, SQLite, 2 worker processes, commit {revision()}")
    print(f"delivery latency (finished_at to receipt): p50 {ms(latency, 0.5):.1f} ms, p99 {ms(latency, 0.99):.1f} ms")
    for owner, values in ending.items():
        print(f"ending write, owner {'with' if owner == 'hooked' else 'without'} an endpoint: p50 {ms(values, 0.5):.2f} ms, p99 {ms(values, 0.99):.2f} ms")
    print(
        "ending write ratio (with / without): "
        f"p50 {percentile(ending['hooked'], 0.5) / percentile(ending['plain'], 0.5):.2f}, "
        f"p99 {percentile(ending['hooked'], 0.99) / percentile(ending['plain'], 0.99):.2f}"
    )

if __name__ == "__main__":
    main()
