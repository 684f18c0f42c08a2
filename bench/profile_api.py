"""Where `POST /v1/messages/validate` and `POST /v1/messages/async` spend their time.

    python bench/profile_api.py            # in-process: timeit of the parts, cProfile of validate
    python bench/profile_api.py --live     # also py-spy on one gunicorn worker under wrk

In-process figures come from Django's test client (the full middleware stack and DRF, no
server); `--live` samples a real sync gunicorn worker (one, so it takes every request) while
wrk loads it, and sorts the samples into buckets by the innermost frame that names one
(needs `pip install py-spy` and `wrk`).

Like bench_api.py it uses a fresh SQLite database in a temporary DATA_DIR, or DATABASE_URL /
REDIS_URL when set; then the messages and the key it created are deleted at the end.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import itertools
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_api import BODY, OWNER, WRK_SCRIPT, ServerConfig, gunicorn, run_wrk  # noqa: E402

# (marker, bucket): a py-spy frame reads "function (path:line)". A sample goes to the bucket of
# the innermost frame that contains a PHASE marker, else of the innermost frame that contains a
# LAYER marker. Phases come first so that an SQL query or a DRF field lands in the phase that
# ran it (auth, check_request, accept), not in the library layer.
PHASES: list[tuple[str, str]] = [
    ("jsonschema/", "check_request: jsonschema check_schema (tools[].input_schema)"),
    ("referencing/", "check_request: jsonschema check_schema (tools[].input_schema)"),
    ("check_request (", "check_request: the rest (DRF fields, warnings, summary)"),
    ("request_hash (", "async: request_hash, normalized, split_secrets"),
    ("normalized (", "async: request_hash, normalized, split_secrets"),
    ("split_secrets (", "async: request_hash, normalized, split_secrets"),
    ("enqueue_token (", "async: enqueue a django-q2 token"),
    ("django/db/transaction.py", "async: transaction BEGIN IMMEDIATE / COMMIT"),
    ("messaging/jobs.py", "async: jobs.accept (ORM inserts MessageJob + MessageEvent)"),
    ("authenticate (", "auth: API key lookup (ORM + SQL + sha512)"),
    ("rest_framework/request.py", "DRF: Request wrapper, body parse"),
    ("rest_framework/response.py", "DRF: render response"),
    ("messaging/views.py", "view: the rest"),
]
LAYERS: list[tuple[str, str]] = [
    ("rest_framework/", "DRF: dispatch, negotiation, permissions, finalize"),
    ("close_old_connections (", "Django: request_started/finished close_old_connections"),
    ("django/dispatch/", "Django: signals"),
    ("messaging/middleware.py", "middleware: RequestID"),
    ("middleware", "middleware: Django's (session, csrf, auth, messages, security...)"),
    ("django/urls/", "Django: URL resolving"),
    ("bench/urls.py", "bare view"),
    ("django/http/", "Django: HttpRequest / HttpResponse"),
    ("django/core/handlers/", "Django: WSGI handler"),
    ("gunicorn/", "gunicorn: accept, HTTP parse, write, close"),
]
DATABASE_FRAMES = ("django/db/", "sqlite3", "psycopg", "redis/")


def classify(stack: str) -> str:
    frames = stack.split(";")[::-1]
    for markers in (PHASES, LAYERS):
        for frame in frames:
            for marker, bucket in markers:
                if marker in frame:
                    return bucket
    return "other"


def setup_django(data_dir: Path) -> str:
    os.environ["DATA_DIR"] = str(data_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from messaging.models import APIKey

    _, key = APIKey.objects.create_key(name=OWNER, owner=OWNER)
    return key


def per_call_us(function: Callable[[], Any], seconds: float = 1.0) -> float:
    timer = timeit.Timer(function)
    number, _ = timer.autorange()
    runs = max(3, int(seconds / max(timer.timeit(number) / number, 1e-9) / number))
    return min(timer.repeat(repeat=runs, number=number)) / number * 1e6


def in_process(key: str, requests: int) -> None:
    import orjson
    from django.db import transaction
    from django.test import Client

    from messaging import jobs, queue, serializers
    from messaging.auth import APIKeyAuthentication
    from messaging.errors import flatten_errors
    from messaging.models import MessageEvent, MessageJob, Status
    from messaging.renderers import JSONRenderer

    body = orjson.dumps(BODY)
    data = orjson.loads(body)
    checked = serializers.check_request(data, endpoint="validate")
    assert checked.valid, checked.errors
    response_body = {
        "valid": checked.valid,
        "errors": checked.errors,
        "warnings": checked.warnings,
        "request_summary": checked.summary,
    }
    values, error_detail = serializers.MESSAGE_REQUEST_SERIALIZER.collect(data)
    schema = data["tools"][0]["input_schema"]
    fake_request = SimpleNamespace(META={"HTTP_AUTHORIZATION": f"Bearer {key}"})
    request = checked.normalized()
    public, secrets = serializers.split_secrets(request)
    fields = {
        "owner": OWNER,
        "model": request["model"],
        "priority": request["priority"],
        "correlation_id": request.get("correlation_id"),
        "request": public,
        "secrets": secrets,
        "request_hash": checked.request_hash(),
        "warnings": checked.warnings,
        "last_sequence": 1,
    }

    print("\nParts, microseconds per call (best of several timeit runs):")
    parts = {
        "check_request(BODY, endpoint='validate')": lambda: serializers.check_request(data, endpoint="validate"),
        "  MESSAGE_REQUEST_SERIALIZER.collect": lambda: serializers.MESSAGE_REQUEST_SERIALIZER.collect(data),
        "    of which _check_json_schema (1 tool, cached)": lambda: serializers._check_json_schema(schema, require_object=True),
        "  flatten_errors": lambda: flatten_errors(error_detail),
        "  _warnings": lambda: serializers._warnings(data, values, endpoint="validate"),
        "  _summary": lambda: serializers._summary(data, values),
        "orjson.loads(body)": lambda: orjson.loads(body),
        "JSONRenderer().render(response)": lambda: JSONRenderer().render(response_body),
        "APIKeyAuthentication().authenticate": lambda: APIKeyAuthentication().authenticate(fake_request),  # type: ignore[arg-type]
    }
    for label, function in parts.items():
        print(f"  {label:<56}{per_call_us(function):>9.1f}")
    long_text = copy.deepcopy(data)
    long_text["system"]["prompt"] += "x" * 50_000
    long_text["messages"][2]["content"][0]["text"] += "x" * 50_000
    label = "check_request, +50k chars in system and in a text block"
    print(f"  {label:<56}{per_call_us(lambda: serializers.check_request(long_text, endpoint='validate')):>9.1f}")
    print("  async only:")
    print(f"  {'  jobs.accept(owner, checked), committed':<56}{per_call_us(lambda: jobs.accept(OWNER, checked)):>9.1f}")
    print(f"  {'    an empty transaction.atomic() (BEGIN + COMMIT)':<56}{per_call_us(transaction.atomic()(lambda: None)):>9.1f}")
    print(f"  {'    checked.request_hash()':<56}{per_call_us(checked.request_hash):>9.1f}")
    print(f"  {'    normalized() + split_secrets()':<56}{per_call_us(lambda: serializers.split_secrets(checked.normalized())):>9.1f}")
    with transaction.atomic():
        # The statements alone, in one transaction that is rolled back: no commit is timed.
        job = MessageJob.objects.create(**fields)
        sequences = itertools.count(2)  # (job, sequence) is unique
        statements = {
            "    MessageJob.objects.create(**fields)": lambda: MessageJob.objects.create(**fields),
            "    MessageEvent.objects.create(...)": lambda: MessageEvent.objects.create(
                job=job, sequence=next(sequences), type="status", data=jobs.status_event(Status.PENDING, None)
            ),
            "    queue.enqueue_token()": queue.enqueue_token,
        }
        for label, function in statements.items():
            print(f"  {label + ' (no commit)':<56}{per_call_us(function, seconds=0.3):>9.1f}")
        transaction.set_rollback(True)

    client = Client(headers={"Authorization": f"Bearer {key}", "Host": "127.0.0.1"})

    def post(path: str, expected: int) -> Callable[[], None]:
        def call() -> None:
            response = client.post(path, body, content_type="application/json")
            assert response.status_code == expected, response.content

        return call

    print(f"\nWhole requests through django.test.Client, ms per request (best of 5 batches of {requests // 5}):")
    calls = {
        "bare": post("/bench/bare", 200),
        "drf (no auth)": post("/bench/drf", 200),
        "drf + auth": post("/bench/drf-auth", 200),
        "validate": post("/v1/messages/validate", 200),
        "async": post("/v1/messages/async", 202),
    }
    for label, call in calls.items():
        for _ in range(50):
            call()
        # The best of five batches: other work on the machine only ever adds time.
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(max(requests // 5, 1)):
                call()
            batches.append((time.perf_counter() - started) / max(requests // 5, 1))
        print(f"  {label:<14}{min(batches) * 1000:>8.3f}")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(requests):
        calls["validate"]()
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"\ncProfile of {requests} validate requests (profiler overhead inflates small calls):")
    print("  cumulative share of selected functions:")
    wanted = [
        ("django/test/client.py", "request", "test client + whole stack"),
        ("messaging/middleware.py", "__call__", "RequestIDMiddleware and everything inside"),
        ("django/core/handlers/base.py", "_get_response", "view resolution + view"),
        ("rest_framework/views.py", "dispatch", "DRF dispatch (all of the view)"),
        ("rest_framework/views.py", "initial", "  DRF initial (auth, permissions, throttles, negotiation)"),
        ("messaging/auth.py", "authenticate", "    API key lookup"),
        ("rest_framework/request.py", "_parse", "  body parse"),
        ("messaging/views.py", "post", "  ValidateView.post"),
        ("messaging/serializers.py", "check_request", "    check_request"),
        ("messaging/serializers.py", "_check_json_schema", "      jsonschema check_schema"),
        ("rest_framework/views.py", "finalize_response", "  DRF finalize_response"),
        ("rest_framework/response.py", "rendered_content", "  render"),
        ("django/db/__init__.py", "close_old_connections", "request_finished: close_old_connections"),
    ]
    for suffix, function, label in wanted:
        for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
            if path.endswith(suffix) and name == function:
                print(f"    {label:<58}{cumulative / total:>7.1%}{cumulative / requests * 1e6:>9.0f} us/req")
                break
    print("  top functions by own time:")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:20]  # type: ignore[attr-defined]
    for (path, line, name), (_, calls_, own, _, _) in rows:
        short = "/".join(Path(path).parts[-2:])
        print(f"    {own / total:>6.1%} {calls_ / requests:>6.0f}/req  {name} ({short}:{line})")


def live(key: str, seconds: int, work: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed (pip install py-spy)")
    with gunicorn(ServerConfig("sync", 1), dict(os.environ), work / "gunicorn.log") as server:
        workers = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 1, workers
        for endpoint in ("bare", "validate", "async"):
            script = work / f"{endpoint}.lua"
            script.write_text(WRK_SCRIPT.format(key=key, body=json.dumps(BODY)))
            run_wrk(server.port, endpoint, script, 2, 8)  # warm-up
            raw = work / f"{endpoint}.folded"
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", workers[0], "--rate", "250", "--duration", str(seconds),
                 "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            result = run_wrk(server.port, endpoint, script, seconds, 8)
            spy.wait()
            buckets: Counter[str] = Counter()
            leaves: dict[str, Counter[str]] = {}
            database = 0
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                bucket = classify(stack)
                buckets[bucket] += int(count)
                leaf = stack.rpartition(";")[2].partition(" (")[0]
                leaves.setdefault(bucket, Counter())[leaf] += int(count)
                if any(marker in stack for marker in DATABASE_FRAMES):
                    database += int(count)
            total = sum(buckets.values())
            per_request_us = 1e6 / result.rps
            print(
                f"\npy-spy, {endpoint}: one sync gunicorn worker under wrk, {result.rps:.0f} req/s "
                f"= {per_request_us:.0f} us/req, {result.non2xx} non-2xx; {total} samples"
            )
            for bucket, count in buckets.most_common():
                top = ", ".join(name for name, _ in leaves[bucket].most_common(3))
                print(f"  {count / total:>6.1%} {count / total * per_request_us:>6.0f} us/req  {bucket}  [{top}]")
            print(f"  database driver/ORM anywhere in the stack: {database / total:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--live", action="store_true", help="also py-spy a gunicorn worker under wrk")
    parser.add_argument("--seconds", type=int, default=15, help="py-spy / wrk duration for --live")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    started = datetime.now(timezone.utc)
    try:
        key = setup_django(work / "data")
        in_process(key, args.requests)
        if args.live:
            live(key, args.seconds, work)
    finally:
        if os.environ.get("DATABASE_URL"):
            # An external database outlives us: take back this run's messages and key. (Their
            # queued tokens stay; a worker that takes one finds nothing to claim.)
            from messaging.models import APIKey, MessageJob

            MessageJob.objects.filter(owner=OWNER, created_at__gte=started).delete()
            APIKey.objects.filter(owner=OWNER, created__gte=started).delete()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
