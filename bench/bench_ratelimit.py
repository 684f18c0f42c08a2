"""What the per-key limits add to POST /v1/messages/async: CPU per request with and without them, in one run.

    python bench/bench_ratelimit.py                   # 3 rounds, about 2 minutes
    python bench/bench_ratelimit.py --rounds 5 --duration 10
    DATABASE_URL=postgres://... REDIS_URL=redis://... python bench/bench_ratelimit.py

One gunicorn (as bench_api.py serves the project: sync workers, 2 x cores), three API keys of
three owners, each measured in turn with wrk on /v1/messages/async with bench_api's body:

- `none`: no limits (the baseline);
- `rate`: a rate limit it never reaches (every request counted: Redis with REDIS_URL, else the
  database's window row);
- `rate+cap`: the same, and a cap on unfinished messages it never reaches (each submission
  takes the owner's lock and counts its unfinished messages, up to the cap). The lock is held
  until the message is committed, so one owner's submissions are stored one at a time: all of
  this load is one owner's, and with PostgreSQL its req/s falls by more than its CPU rises.

The rounds interleave the keys (none, rate, rate+cap, none, ...) so that a neighbour's load
falls on all three alike; the figure is gunicorn's CPU time per request (steadier than req/s on
a shared machine): each limited key's median against the baseline's, and the median of each
round's ratio. A few per cent is within what a busy neighbour moves such figures, so the run
also times the limiter's own steps in one process without load, and says what share of the
baseline's CPU per request they are.

No qcluster runs. A stand-in for a fleet that keeps up marks the bench owners' pending messages
completed every 0.1 s, from a process of its own (its CPU is not gunicorn's), in every
configuration alike: the unfinished count stays as small as real workers would leave it, which
is what the cap's count costs. (Without it the backlog grows by hundreds a second and the count
walks all of it, up to the cap.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_api import (  # noqa: E402 - after the path
    BODY, PYTHON, WRK_SCRIPT, ServerConfig, gunicorn, manage, post, revision, run_wrk, stop_process, store_description,
)

NEVER_REACHED = 1_000_000_000
CAP = 1000
KEYS = {
    "none": {},
    "rate": {"rate_limit_rpm": NEVER_REACHED},
    "rate+cap": {"rate_limit_rpm": NEVER_REACHED, "max_unfinished": CAP},
}
OWNERS = {name: f"bench-rl-{name.replace('+', '-')}" for name in KEYS}

FINISHER = f"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # report on the way out
from django.db import connection
from messaging.models import MessageJob
owners = {list(OWNERS.values())!r}
most = 0
try:
    while True:
        most = max(most, MessageJob.objects.filter(owner__in=owners, status="pending").update(status="completed"))
        connection.close()  # no transaction held open between rounds
        time.sleep(0.1)
finally:
    print(f"most pending at once: {{most}}", flush=True)
"""


# The limiter's own steps in one process without load, in CPU time (what the runs under load
# measure, without their noise): the rate's one call to its store; the cap's lock and count,
# inside a transaction that has begun (accept's, which inserts the message anyway); the headers.
STEPS = f"""
import time, timeit
from django.db import connection, transaction
from django.http import HttpRequest
from messaging import ratelimit
from messaging.auth import Owner
owner = Owner({OWNERS["rate+cap"]!r}, rate_limit_rpm={NEVER_REACHED}, max_unfinished={CAP})
request = HttpRequest()
def rate():
    ratelimit.count_request(request, owner, "bench-rl")
def transaction_only():
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT 1")
def cap():
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        ratelimit.hold_unfinished(owner.name, owner.max_unfinished)
def headers():
    ratelimit.add_headers(request, {{}})
def cpu_us(step):
    step()
    return min(timeit.repeat(step, number=500, repeat=5, timer=time.process_time)) / 500 * 1e6
print(cpu_us(rate), cpu_us(cap) - cpu_us(transaction_only), cpu_us(headers))
"""


def create_keys(env: dict[str, str]) -> dict[str, str]:
    code = f"""
from messaging.models import APIKey
for name, (owner, limits) in {{name: (owner, limits) for name, owner, limits in {[(n, OWNERS[n], KEYS[n]) for n in KEYS]!r}}}.items():
    print(name, APIKey.objects.create_key(name=owner, owner=owner, **limits)[1])
"""
    lines = manage(env, "shell", "--no-imports", "-c", code).split("\n")
    return dict(line.split(" ", 1) for line in lines if line.strip())


def clean_up(env: dict[str, str]) -> None:
    code = f"""
from messaging.models import APIKey, MessageJob, RateLimitWindow
owners = {list(OWNERS.values())!r}
prefixes = list(APIKey.objects.filter(owner__in=owners).values_list("prefix", flat=True))
MessageJob.objects.filter(owner__in=owners).delete()
RateLimitWindow.objects.filter(key_prefix__in=[*prefixes, "bench-rl"]).delete()
APIKey.objects.filter(owner__in=owners).delete()
"""
    manage(env, "shell", "--no-imports", "-c", code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=ServerConfig.parse, default=ServerConfig("sync", 2 * (os.cpu_count() or 1)), help="gunicorn: sync:N or gthread:NxT")
    parser.add_argument("--duration", type=int, default=8, help="seconds measured per key and round (8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first (2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of none, rate, rate+cap (3)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    env = dict(os.environ, DATA_DIR=str(work / "data"), DJANGO_SETTINGS_MODULE="bench.settings")
    for name in ("MESSAGING_RATE_LIMIT_RPM", "MESSAGING_MAX_UNFINISHED"):
        env.pop(name, None)  # the keys say which limits apply
    print(f"{datetime.now():%Y-%m-%d %H:%M}, commit {revision()}, {os.cpu_count()} cores, body {len(json.dumps(BODY))} bytes")
    print(store_description(env) + ("; rate limiter: Redis" if env.get("REDIS_URL") else "; rate limiter: the database"))
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    manage(env, "migrate", "--noinput")
    clean_up(env)
    keys = create_keys(env)
    finisher = subprocess.Popen(
        [PYTHON, "manage.py", "shell", "--no-imports", "-c", FINISHER], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    cpu: dict[str, list[float]] = {name: [] for name in KEYS}
    rps: dict[str, list[float]] = {name: [] for name in KEYS}
    refused = 0
    try:
        scripts = {}
        for name, key in keys.items():
            scripts[name] = work / f"{name.replace('+', '-')}.lua"
            scripts[name].write_text(WRK_SCRIPT.format(key=key, body=json.dumps(BODY)))
        print(f"\n== {args.config}, wrk 1 thread, {args.connections} connections, {args.warmup} s warm-up + {args.duration} s per key and round", flush=True)
        with gunicorn(args.config, env, work / "gunicorn.log") as server:
            for name, key in keys.items():
                status, body = post(server.port, "/v1/messages/async", key)
                assert status == 202, (name, status, body)
            for round_ in range(1, args.rounds + 1):
                for name in KEYS:
                    if args.warmup:
                        run_wrk(server.port, "async", scripts[name], args.warmup, args.connections)
                    result = run_wrk(server.port, "async", scripts[name], args.duration, args.connections, server.pid)
                    refused += result.non2xx
                    cpu[name].append(result.cpu_ms)
                    rps[name].append(result.rps)
                    print(f"  round {round_} {name:<9}{result.rps:8.0f} req/s {result.cpu_ms:7.3f} CPU ms/req  non-2xx {result.non2xx}", flush=True)
        steps = [float(value) for value in manage(env, "shell", "--no-imports", "-c", STEPS).split()]
    finally:
        stop_process(finisher, timeout=5)
        finished = (finisher.stdout.read() if finisher.stdout else "").strip()
        clean_up(env)
        shutil.rmtree(work, ignore_errors=True)

    base = median(cpu["none"])
    print(f"\nload average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}; finisher: {finished or 'no report'}")
    print("Under load (gunicorn's CPU per request; medians, and each round against its own baseline):")
    print(f"{'key':<10}{'req/s':>8}{'CPU ms/req':>12}{'min-max':>14}{'CPU added':>11}{'per round':>11}")
    for name in KEYS:
        spread = f"{min(cpu[name]):.3f}-{max(cpu[name]):.3f}"
        added = per_round = ""
        if name != "none":
            added = f"{median(cpu[name]) / base - 1:+.1%}"
            per_round = f"{median([mine / none - 1 for mine, none in zip(cpu[name], cpu['none'])]):+.1%}"
        print(f"{name:<10}{median(rps[name]):>8.0f}{median(cpu[name]):>12.3f}{spread:>14}{added:>11}{per_round:>11}")
    rate_us, cap_us, headers_us = steps
    print(
        f"The limiter's steps in one process, no load, CPU: rate {rate_us:.0f} us, cap {cap_us:.0f} us, headers "
        f"{headers_us:.0f} us; rate {rate_us / 1000 / base:+.1%} and rate+cap {(rate_us + cap_us + headers_us) / 1000 / base:+.1%} "
        "of the baseline's CPU per request"
    )
    print(f"aim: under +5.0% of POST /v1/messages/async's CPU per request (baseline {base:.3f} ms)")
    if refused:
        print(f"WARNING: {refused} responses were errors (a limit reached?); the figures above are not trustworthy.")


if __name__ == "__main__":
    main()
