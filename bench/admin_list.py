"""How the admin's message list scales: the same pages on 1,000 and on 1,000,000 messages.

    python bench/admin_list.py                         # SQLite in a temporary DATA_DIR
    python bench/admin_list.py --rows 200000 --repeat 3
    python bench/admin_list.py --database-url postgres://postgres@127.0.0.1:5432/admin_bench

Rows are written with one INSERT ... SELECT per 100,000 (a recursive CTE on SQLite,
generate_series on PostgreSQL), newest first in id order so that the first 1,000 rows are also
the newest 1,000: the small run is a prefix of the large one. Statuses, models and correlation
ids are spread like a busy service's (mostly completed; a few percent failed, pending...).

Each page is fetched through Django's test client, logged in as a superuser, once to warm up
and then `--repeat` times; the median is reported, with its ratio to the same page on 1,000
rows and the slowest SQL statement of one more, captured, fetch. A page that scales with the
table shows a ratio in the hundreds; one that does not stays near 1.

A PostgreSQL database given with --database-url must be a dedicated, empty one: the run
refuses to start if it already holds messages, and deletes what it wrote at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 100_000
SMALL = 1_000

REQUEST_JSON = '{"messages": [{"role": "user", "content": [{"type": "text", "text": "Where is order 48213?"}]}], "model": "echo", "max_tokens": 1024, "stream": false, "priority": 5}'
RESULT_JSON = '{"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Where is order 48213?"}], "stop_reason": "end_turn"}'

# i % 200 → status: 1% pending, 0.5% processing, 3% failed, 1% error, 4% cancelled, the rest completed.
STATUS_CASE = """CASE
    WHEN i %% 200 < 2 THEN 'pending'
    WHEN i %% 200 = 2 THEN 'processing'
    WHEN i %% 200 < 9 THEN 'failed'
    WHEN i %% 200 < 11 THEN 'error'
    WHEN i %% 200 < 19 THEN 'cancelled'
    ELSE 'completed' END"""

SQLITE_INSERT = f"""
WITH RECURSIVE n(i) AS (SELECT %s UNION ALL SELECT i + 1 FROM n WHERE i < %s)
INSERT INTO messaging_messagejob (
    id, message_id, owner, status, model, priority, correlation_id, request, secrets, request_hash,
    warnings, result, error, attempts, handed_back, request_id, lease_expires_at, last_sequence, created_at, started_at, finished_at)
SELECT i, printf('msg_bench_%%010d', i), 'owner-' || (i %% 50), {STATUS_CASE},
    CASE WHEN i %% 7 = 0 THEN 'echo-slow' ELSE 'echo' END, i %% 11, 'order-' || (i / 3),
    %s, '{{}}', 'bench', '[]', %s, NULL, 1, 0, '', NULL, 9,
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds'),
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds', '+1 seconds'),
    strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || i || ' seconds', '+3 seconds')
FROM n
"""

POSTGRES_INSERT = f"""
INSERT INTO messaging_messagejob (
    id, message_id, owner, status, model, priority, correlation_id, request, secrets, request_hash,
    warnings, result, error, attempts, handed_back, request_id, lease_expires_at, last_sequence, created_at, started_at, finished_at)
SELECT i, 'msg_bench_' || lpad(i::text, 10, '0'), 'owner-' || (i %% 50), {STATUS_CASE},
    CASE WHEN i %% 7 = 0 THEN 'echo-slow' ELSE 'echo' END, i %% 11, 'order-' || (i / 3),
    %s::jsonb, '{{}}'::jsonb, 'bench', '[]'::jsonb, %s::jsonb, NULL, 1, 0, '', NULL, 9,
    now() - make_interval(secs => i), now() - make_interval(secs => i - 1), now() - make_interval(secs => i - 3)
FROM generate_series(%s, %s) AS i
"""


def setup_django(database_url: str | None, *, prefix: str = "admin-bench-") -> None:
    """Django on `database_url`, or on SQLite in a fresh DATA_DIR (bench_metrics.py too)."""
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
        os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix=prefix)
    os.environ["ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))  # settings require one
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def fill(first: int, last: int, *, sqlite_insert: str = SQLITE_INSERT, postgres_insert: str = POSTGRES_INSERT) -> None:
    """Rows `first`..`last`, one INSERT ... SELECT per CHUNK (bench_metrics.py brings its own)."""
    from django.db import connection, transaction

    sql = postgres_insert if connection.vendor == "postgresql" else sqlite_insert
    for start in range(first, last + 1, CHUNK):
        end = min(start + CHUNK - 1, last)
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(sql, [REQUEST_JSON, RESULT_JSON, start, end])
            else:
                cursor.execute(sql, [start, end, REQUEST_JSON, RESULT_JSON])
        print(f"  rows {start:>9,}..{end:>9,} in {time.perf_counter() - started:5.1f} s", flush=True)
    settle()


def settle() -> None:
    """Statistics, and on PostgreSQL the visibility map autovacuum would have set by now."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE messaging_messagejob" if connection.vendor == "postgresql" else "ANALYZE")


def pages() -> list[tuple[str, str]]:
    from django.utils import timezone

    # The same bounds the admin's "Past 7 days" link carries (aware datetimes).
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    week = urlencode({"created_at__gte": str(today - timedelta(days=7)), "created_at__lt": str(today + timedelta(days=1))})
    return [
        ("list, no filter", ""),
        ("list, page 5", "?p=5"),
        ("status = pending (1%)", "?status__exact=pending"),
        ("status = failed (3%)", "?status__exact=failed"),
        ("model = echo-slow (14%)", "?model=echo-slow"),
        ("created in the past 7 days", f"?{week}"),
        ("status + model", "?status__exact=failed&model=echo-slow"),
        ("search message_id", "?q=msg_bench_0000000500"),
        ("search correlation_id", "?q=order-166"),
        ("search, no match", "?q=nothing-like-this"),
        ("one message's page", "500/change/"),
    ]


class SlowestQuery:
    """An execute wrapper that remembers the slowest statement (DEBUG's timings are in ms)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.sql = ""

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.perf_counter() - started
            if elapsed > self.seconds:
                self.seconds, self.sql = elapsed, sql


def time_pages(client: Any, repeat: int) -> dict[str, tuple[float, int, float, str]]:
    """{page: (median ms, rows shown, slowest SQL ms, slowest SQL)}"""
    from django.db import connection

    results = {}
    for name, suffix in pages():
        url = "/admin/messaging/messagejob/" + suffix
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        shown = response.content.decode().count('class="action-select"')
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            client.get(url)
            samples.append((time.perf_counter() - started) * 1000)
        slowest = SlowestQuery()
        with connection.execute_wrapper(slowest):
            client.get(url)
        results[name] = (statistics.median(samples), shown, slowest.seconds * 1000, slowest.sql)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", help="a dedicated, empty PostgreSQL database (default: SQLite in a temp dir)")
    parser.add_argument("--show-sql", action="store_true", help="print each page's slowest statement")
    args = parser.parse_args()

    setup_django(args.database_url)
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    from messaging.models import MessageJob

    print(f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]} {settings.DATABASES['default']['NAME']}")
    call_command("migrate", verbosity=0)
    if MessageJob.objects.exists():
        sys.exit("The database already holds messages; give the bench a dedicated, empty one.")
    user = User.objects.create_superuser("admin-bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)

    try:
        print(f"filling {SMALL:,} messages")
        fill(1, SMALL)
        small = time_pages(client, args.repeat)
        print(f"filling up to {args.rows:,} messages")
        fill(SMALL + 1, args.rows)
        large = time_pages(client, args.repeat)
    finally:
        if args.database_url:
            # The database was empty of messages: take them all away at once (an ORM delete
            # would load a million rows to cascade).
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("TRUNCATE messaging_messageevent, messaging_messagejob")
            user.delete()

    print()
    # "shown" is the rows on the page: a filter that matches 10 of 1,000 rows fills a page of
    # 100 on a million, and rendering rows is most of a page's cost, so compare like with like.
    print(f"{'page':<28} {f'{SMALL:,} rows':>10} {'shown':>5} {f'{args.rows:,} rows':>14} {'shown':>5} {'ratio':>6} {'slowest SQL':>12}")
    for name, (large_ms, large_shown, sql_ms, sql) in large.items():
        small_ms, small_shown = small[name][:2]
        print(
            f"{name:<28} {small_ms:>7.1f} ms {small_shown:>5} {large_ms:>11.1f} ms {large_shown:>5} "
            f"{large_ms / small_ms:>6.1f} {sql_ms:>9.1f} ms"
        )
        if args.show_sql:
            print(f"    {sql[:300]}")


if __name__ == "__main__":
    main()
