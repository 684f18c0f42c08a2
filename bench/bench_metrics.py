"""What a scrape of GET /metrics costs on an empty table and on a million messages.

    python bench/bench_metrics.py                       # SQLite in a temporary DATA_DIR, ~1 min
    python bench/bench_metrics.py --rows 200000 --repeat 100
    python bench/bench_metrics.py --database-url postgres://postgres@127.0.0.1:5432/metrics_bench
    python bench/bench_metrics.py --backlog             # also: every message pending

A scrape has two parts: the counters and histograms every process wrote to its files
(prometheus_client's multiprocess mode), added up, and the queue's gauges, read from the
database through the partial indexes of pending and processing messages. The first depends on
how many processes wrote and how many series they hold, not on the table; the second should
depend on how many messages wait and run, not on how many the table holds.

So the metrics directory is filled first, the same for every measurement: `--processes` forked
processes (as django-q2 forks its workers) each count for `--models` models every series the
service has (accepted by source, finished and durations by status, queue waits, first tokens,
upstream attempts and four error types, both rate limits), then exit: the files of processes
that ended still count, as on a machine that has run for a while. Then, in one run:

1. the bare view: GET /healthz, a plain Django view (no database), through the same client and
   middleware: what any request costs here;
2. a scrape with an empty table;
3. a scrape with `--rows` messages (1% pending over every priority, 0.5% processing, the rest
   finished: a busy service's spread), after ANALYZE (VACUUM ANALYZE on PostgreSQL, as
   autovacuum would leave it);
4. with `--backlog`, the same rows all pending: a queue a million deep, the worst case.

Requests go through Django's test client in this process (REMOTE_ADDR 127.0.0.1, so no token
is needed), alternating bare and scrape, `--repeat` of each after a warm-up; the medians are
reported with ratios to the bare view and to the empty-table scrape, with the queue's SQL timed
on its own. The aim: a scrape under 100 ms at a million messages.

A PostgreSQL database given with --database-url must be a dedicated, empty one: the run refuses
to start if it already holds messages, and deletes what it wrote at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import admin_list  # noqa: E402

MODELS = ("echo", "echo-slow", "gpt-4o-mini", "claude-sonnet", "llama-3.1-8b", "qwen2.5")

REQUEST_JSON = '{"messages": [{"role": "user", "content": "Where is order 48213?"}], "model": "echo", "max_tokens": 1024, "stream": false, "priority": 5}'
RESULT_JSON = '{"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Where is order 48213?"}], "stop_reason": "end_turn"}'

# i % 200 → status: 1% pending, 0.5% processing, 3% failed, 1% error, 3.5% cancelled, 0.5% expired, the rest completed.
STATUS_CASE = """CASE
    WHEN i %% 200 < 2 THEN 'pending'
    WHEN i %% 200 = 2 THEN 'processing'
    WHEN i %% 200 < 9 THEN 'failed'
    WHEN i %% 200 < 11 THEN 'error'
    WHEN i %% 200 < 18 THEN 'cancelled'
    WHEN i %% 200 = 18 THEN 'expired'
    ELSE 'completed' END"""
COLUMNS = """id, message_id, owner, status, model, priority, correlation_id, request_id, request, secrets,
    request_hash, warnings, result, error, attempts, handed_back, lease_expires_at, last_sequence,
    created_at, started_at, finished_at"""

# Newest first in id order; created i seconds ago, so the oldest pending message is days old.
SQLITE_INSERT = f"""
WITH RECURSIVE n(i) AS (SELECT %s UNION ALL SELECT i + 1 FROM n WHERE i < %s)
INSERT INTO messaging_messagejob ({COLUMNS})
SELECT i, printf('msg_bench_%%010d', i), 'owner-' || (i %% 50), {STATUS_CASE},
    CASE WHEN i %% 7 = 0 THEN 'echo-slow' ELSE 'echo' END, i %% 11, 'order-' || (i / 3), '',
    %s, '{{}}', 'bench', '[]', %s, NULL, 1, 0,
    CASE WHEN i %% 200 = 2 THEN strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '+30 seconds') END, 9,
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds'),
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds', '+1 seconds'),
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds', '+3 seconds')
FROM n
"""

POSTGRES_INSERT = f"""
INSERT INTO messaging_messagejob ({COLUMNS})
SELECT i, 'msg_bench_' || lpad(i::text, 10, '0'), 'owner-' || (i %% 50), {STATUS_CASE},
    CASE WHEN i %% 7 = 0 THEN 'echo-slow' ELSE 'echo' END, i %% 11, 'order-' || (i / 3), '',
    %s::jsonb, '{{}}'::jsonb, 'bench', '[]'::jsonb, %s::jsonb, NULL, 1, 0,
    CASE WHEN i %% 200 = 2 THEN now() + interval '30 seconds' END, 9,
    now() - make_interval(secs => i), now() - make_interval(secs => i - 1), now() - make_interval(secs => i - 3)
FROM generate_series(%s, %s) AS i
"""


def setup_django(database_url: str | None) -> None:
    os.environ.pop("REDIS_URL", None)  # a scrape never touches the broker
    # A directory of this run's own: only the processes below count into it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-bench-files-")
    os.environ.pop("METRICS_TOKEN", None)
    admin_list.setup_django(database_url, prefix="metrics-bench-")


def count_in_processes(processes: int, models: int) -> None:
    """`processes` forked children each count every series for `models` models, then exit."""
    from django.db import connections

    from messaging import metrics

    connections.close_all()  # a child must not share the parent's database connection
    for number in range(processes):
        pid = os.fork()
        if pid == 0:
            try:
                generator = random.Random(number)
                for model in MODELS[:models]:
                    for source in ("async", "sync", "retry"):
                        metrics.ACCEPTED.labels(model, source).inc(generator.randint(1, 1000))
                    for status in ("completed", "failed", "error", "cancelled", "expired"):
                        metrics.FINISHED.labels(model, status).inc(generator.randint(1, 1000))
                    for _ in range(20):
                        metrics.DURATION.labels(model).observe(generator.expovariate(1 / 5))
                        metrics.QUEUE_WAIT.labels(model).observe(generator.expovariate(1 / 2))
                        metrics.FIRST_TOKEN.labels(model).observe(generator.expovariate(1 / 0.5))
                    metrics.upstream_attempt("openai", model)
                    for error_type in ("rate_limit_error", "overloaded_error", "api_error", "timeout_error"):
                        metrics.upstream_error("openai", model, error_type)
                for kind in ("requests", "unfinished"):
                    metrics.rate_limited(kind)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(f"a counting process failed ({status})")


def fill(first: int, last: int) -> None:
    admin_list.fill(first, last, sqlite_insert=SQLITE_INSERT, postgres_insert=POSTGRES_INSERT)


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def measure(client: object, repeat: int) -> dict[str, list[float]]:
    """Milliseconds of each, alternating so that the machine's noise falls on all alike."""
    from messaging.metrics import QueueCollector

    def bare() -> None:
        assert client.get("/healthz").status_code == 200  # type: ignore[attr-defined]

    def scrape() -> None:
        response = client.get("/metrics")  # type: ignore[attr-defined]
        assert response.status_code == 200, response.content

    def queue_sql() -> None:
        list(QueueCollector().collect())

    runs: dict[str, Callable[[], None]] = {"bare": bare, "scrape": scrape, "queue SQL": queue_sql}
    for run in runs.values():  # warm-up
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(timed(run))
    return times


def describe_files(client: object) -> str:
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    body = client.get("/metrics").content.decode()  # type: ignore[attr-defined]
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    return f"{len(list(directory.glob('*.db')))} files, {series:,} series, {len(body) / 1024:.0f} KB per scrape"


def explain() -> list[str]:
    """The query plan of the queue's gauges (to check that indexes serve every part of it)."""
    from django.db import connection

    from messaging.metrics import queue_sql

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + queue_sql())
            return sorted({str(row[-1]) for row in cursor.fetchall() if "INDEX" in str(row[-1]) or "SCAN" in str(row[-1])})
        cursor.execute("EXPLAIN " + queue_sql())
        # One line per kind of scan, without the subqueries' aliases and costs.
        return sorted({re.sub(r" messaging_messagejob_\d+|\s+\(cost=.*", "", line).strip(" ->") for (line,) in cursor.fetchall() if "Scan" in line})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--processes", type=int, default=12, help="processes whose metric files a scrape adds up")
    parser.add_argument("--models", type=int, default=4, choices=range(1, len(MODELS) + 1))
    parser.add_argument("--backlog", action="store_true", help="also measure with every message pending")
    parser.add_argument("--database-url", help="a dedicated, empty PostgreSQL database (default: SQLite in a temp dir)")
    args = parser.parse_args()

    setup_django(args.database_url)
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from messaging.models import MessageJob

    database = settings.DATABASES["default"]
    print(f"database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}")
    call_command("migrate", verbosity=0)
    if MessageJob.objects.exists():
        sys.exit("The database already holds messages; give the bench a dedicated, empty one.")
    count_in_processes(args.processes, args.models)
    client = Client()
    print(f"metrics directory: {args.processes} processes that counted {args.models} models: {describe_files(client)}")

    results: list[tuple[str, dict[str, list[float]]]] = []
    try:
        admin_list.settle()
        results.append(("empty table", measure(client, args.repeat)))
        print(f"filling {args.rows:,} messages")
        fill(1, args.rows)
        pending = MessageJob.objects.filter(status="pending").count()
        processing = MessageJob.objects.filter(status="processing").count()
        results.append((f"{args.rows:,} rows ({pending:,} pending, {processing:,} processing)", measure(client, args.repeat)))
        for plan in explain():
            print(f"  plan: {plan}")
        if args.backlog:
            print("making every message pending")
            started = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute("UPDATE messaging_messagejob SET status = 'pending', lease_expires_at = NULL")
            admin_list.settle()
            print(f"  in {time.perf_counter() - started:.1f} s")
            results.append((f"{args.rows:,} rows, all pending", measure(client, args.repeat)))
    finally:
        if args.database_url:
            with connection.cursor() as cursor:
                cursor.execute("TRUNCATE messaging_messageevent, messaging_messagejob CASCADE")

    bare = statistics.median(results[0][1]["bare"])
    empty = statistics.median(results[0][1]["scrape"])
    print()
    print(f"medians of {args.repeat}, ms; the bare view (GET /healthz) is the baseline, measured beside each scrape")
    print(f"{'table':<48} {'bare':>6} {'scrape':>7} {'p90':>7} {'queue SQL':>9} {'vs bare':>8} {'vs empty':>8}")
    for name, times in results:
        scrape = statistics.median(times["scrape"])
        p90 = statistics.quantiles(times["scrape"], n=10)[-1]
        print(
            f"{name:<48} {statistics.median(times['bare']):>6.2f} {scrape:>7.2f} {p90:>7.2f} "
            f"{statistics.median(times['queue SQL']):>9.2f} {scrape / bare:>7.1f}x {scrape / empty:>7.2f}x"
        )
    usual = statistics.median(results[1][1]["scrape"])
    print(f"aim: a scrape under 100 ms with {args.rows:,} messages: {'met' if usual < 100 else 'NOT met'} ({usual:.1f} ms)")
    if args.backlog:
        deep = statistics.median(results[2][1]["scrape"])
        print(f"     with all of them pending: {deep:.1f} ms ({'within' if deep < 100 else 'over'} the aim)")


if __name__ == "__main__":
    main()
