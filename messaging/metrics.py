"""Prometheus metrics: the calls that count, and GET /metrics.

Two sources, so that a scrape is right however many web and worker processes there are, and
stays cheap whatever the size of the table:

- Counters and histograms are counted where things happen, in whichever process: web processes
  accept messages and run the synchronous ones, workers run the rest, any process may end one
  (a cancel). prometheus_client's multiprocess mode keeps each process's values in files of its
  own (PROMETHEUS_MULTIPROC_DIR, set in project/settings.py) and a scrape adds up every file of
  the directory, a process that ended included: a count never goes back while the machine's
  processes run. A forked process (django-q2's workers) starts files of its own.
- The queue's gauges (pending by priority band, the oldest pending's age, in flight) are read
  from the database at each scrape, in one statement of index look-ups (`queue_sql`): the same
  truth on every machine, costing the rows that wait or run, never the table. Only open streams are a gauge of each process ("livesum"); a dead process's share is
  dropped at the next scrape.

A message's end is counted when the transaction that wrote it commits, by the process that
wrote it: once, whoever won the race.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from datetime import timezone as dt_timezone
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from rest_framework import exceptions

from messaging.errors import error_response
from messaging.models import MessageJob, Status

logger = logging.getLogger(__name__)

# prometheus_client picks its value class when first imported; should anything have imported it
# before the settings named the directory, pick again, or this process's counts would be lost.
if not values.ValueClass._multiprocess and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    values.ValueClass = values.get_value_class()

# The ends a message's duration is observed for (messaging_message_duration_seconds).
RAN_TO_AN_END = (Status.COMPLETED, Status.FAILED, Status.ERROR)

# Priorities 0-10 (5 by default), in the bands the queue's gauges report.
PRIORITIES = range(0, 11)
PRIORITY_BANDS = (("low", range(0, 4)), ("normal", range(4, 7)), ("high", range(7, 11)))

# Seconds. A queue wait or a run spans milliseconds (an idle queue, echo) to an hour (a backlog,
# MESSAGING_JOB_TIMEOUT); a model's first token, tens of milliseconds to a couple of minutes.
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

# registry=None: nothing registers in the default registry; a scrape reads the files.
ACCEPTED = Counter(
    "messaging_messages_accepted", "Messages accepted, by model and by how: async (POST /v1/messages/async), "
    "sync (POST /v1/messages) or retry (the admin's Retry).", ["model", "source"], registry=None,
)
FINISHED = Counter(
    "messaging_messages_finished", "Messages that reached a terminal status, by model and status.",
    ["model", "status"], registry=None,
)
QUEUE_WAIT = Histogram(
    "messaging_queue_wait_seconds", "From accepted to first claimed by a worker, by model.",
    ["model"], buckets=WAIT_BUCKETS, registry=None,
)
FIRST_TOKEN = Histogram(
    "messaging_time_to_first_token_seconds", "From an attempt's start to the model's first content delta, by model.",
    ["model"], buckets=FIRST_TOKEN_BUCKETS, registry=None,
)
# By model only: a scrape adds up every series of every process's files, and a histogram is 18
# series per label set. The end's status is in messaging_messages_finished_total.
DURATION = Histogram(
    "messaging_message_duration_seconds", "From a message's first start to its end, for messages that ran to "
    "completed, failed or error, by model.", ["model"], buckets=DURATION_BUCKETS, registry=None,
)
UPSTREAM_ATTEMPTS = Counter(
    "messaging_upstream_attempts", "Requests to model servers, each retry one more, by provider and model.",
    ["provider", "model"], registry=None,
)
UPSTREAM_ERRORS = Counter(
    "messaging_upstream_errors", "Upstream attempts that failed, by provider, model and error type "
    "(the `error.type` a message gets when no attempt is left).", ["provider", "model", "error_type"], registry=None,
)
RATE_LIMITED = Counter(
    "messaging_rate_limited_requests", "Requests refused by a key's limit: requests (per minute) or "
    "unfinished (pending and processing messages).", ["kind"], registry=None,
)


@functools.cache
def _streams_open() -> Gauge:
    # Made on first use: a metric without labels opens its process's file at once, and every
    # manage.py command would leave one behind.
    return Gauge(
        "messaging_streams_open", "Event streams open to clients (GET /v1/messages/{message_id}/stream, "
        "POST /v1/messages with stream).", registry=None, multiprocess_mode="livesum",
    )


# --- Counting: called by the modules where things happen ------------------------------------------


def accepted(model: str, source: str) -> None:
    ACCEPTED.labels(model, source).inc()


def claimed(jobs: Iterable[MessageJob]) -> None:
    """Queue waits of messages claimed for their first attempt (a rescued or handed-back
    message's attempt is not a wait in the queue)."""
    for job in jobs:
        if job.attempts == 1 and job.started_at is not None:
            QUEUE_WAIT.labels(job.model).observe(max(0.0, (job.started_at - job.created_at).total_seconds()))


def first_token(model: str, seconds: float) -> None:
    FIRST_TOKEN.labels(model).observe(seconds)


def ended(jobs: list[MessageJob]) -> None:
    """Messages that just reached a terminal status: called in the transaction that wrote it
    (jobs._ended, which read them), counted once it commits."""
    rows = [(job.model, job.status, job.started_at, job.finished_at) for job in jobs]
    transaction.on_commit(functools.partial(_count_ends, rows), robust=True)


def _count_ends(rows: list[tuple[str, str, datetime | None, datetime | None]]) -> None:
    for model, status, started_at, finished_at in rows:
        FINISHED.labels(model, status).inc()
        # A cancelled run's length is the client's choice, not the model's time.
        if status in RAN_TO_AN_END and started_at is not None and finished_at is not None:
            DURATION.labels(model).observe(max(0.0, (finished_at - started_at).total_seconds()))


def upstream_attempt(provider: str, model: str) -> None:
    UPSTREAM_ATTEMPTS.labels(provider, model).inc()


def upstream_error(provider: str, model: str, error_type: str) -> None:
    UPSTREAM_ERRORS.labels(provider, model, error_type).inc()


def rate_limited(kind: str) -> None:
    """A request refused by a rate limit; `kind` is "requests" or "unfinished"."""
    RATE_LIMITED.labels(kind).inc()


@contextlib.asynccontextmanager
async def stream_open() -> AsyncIterator[None]:
    """Around an event stream's life: `async with hub.watch(...), metrics.stream_open():`."""
    gauge = _streams_open()
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


# --- GET /metrics ---------------------------------------------------------------------------------


class QueueCollector:
    """The queue's gauges, read from the database at each scrape in one statement of index
    look-ups (`queue_sql`): they cost the messages pending and processing, never the table."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = timezone.now()
        try:
            with connection.cursor() as cursor:
                cursor.execute(queue_sql())
                row = cursor.fetchone()
        except DatabaseError as exc:
            # The counters are still worth having; the gauges are missing from this scrape.
            logger.warning("metrics: the queue's gauges could not be read: %s: %s", type(exc).__name__, exc)
            return
        counts, oldest_by_priority, in_flight = row[: len(PRIORITY_BANDS)], row[len(PRIORITY_BANDS) : -1], row[-1]
        pending = GaugeMetricFamily("messaging_messages_pending", "Messages waiting in the queue, by priority band "
                                    "(low 0-3, normal 4-6, high 7-10).", labels=["priority_band"])
        oldest = GaugeMetricFamily("messaging_oldest_pending_age_seconds", "Age of the oldest pending message, by "
                                   "priority band; 0 when none waits.", labels=["priority_band"])
        for (band, priorities), count in zip(PRIORITY_BANDS, counts):
            pending.add_metric([band], count)
            first = min((_datetime(oldest_by_priority[priority]) for priority in priorities if oldest_by_priority[priority]), default=None)
            oldest.add_metric([band], max(0.0, (now - first).total_seconds()) if first else 0.0)
        yield pending
        yield oldest
        yield GaugeMetricFamily("messaging_messages_in_flight", "Messages processing now (running, or whose worker "
                                "died and whose lease has not run out yet).", value=in_flight)


def queue_sql() -> str:
    """Pending messages per band (a range of job_pending_queue each), the oldest of each priority
    (one index entry each) and the processing ones (job_status_created), as one row.

    The statuses are written into the SQL, not passed as parameters: SQLite then sees that the
    partial index's condition holds and counts from the index alone. With a parameter it reads
    every pending row from the table as well (1.5 s rather than 60 ms for a million pending)."""
    table = connection.ops.quote_name(MessageJob._meta.db_table)
    pending = f"FROM {table} WHERE status = '{Status.PENDING.value}'"
    columns = [f"(SELECT COUNT(*) {pending} AND priority BETWEEN {band[0]} AND {band[-1]})" for _, band in PRIORITY_BANDS]
    columns += [f"(SELECT MIN(created_at) {pending} AND priority = {priority})" for priority in PRIORITIES]
    columns.append(f"(SELECT COUNT(*) FROM {table} WHERE status = '{Status.PROCESSING.value}')")
    return "SELECT " + ", ".join(columns)


def _datetime(value: datetime | str) -> datetime:
    # SQLite returns a datetime column as its text (UTC) when read without the ORM.
    return value if isinstance(value, datetime) else datetime.fromisoformat(value).replace(tzinfo=dt_timezone.utc)


def forget_dead_processes(directory: Path) -> None:
    """Drop the per-process gauges (open streams) of processes that are gone: killed, or ended
    without telling anyone. Their counters stay: what they counted happened."""
    for path in directory.glob("gauge_live*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


# A request a proxy passed on carries one of these: its REMOTE_ADDR is the proxy's, not the client's.
_FORWARDED = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _refusal(request: HttpRequest) -> exceptions.APIException | None:
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        return exceptions.AuthenticationFailed("GET /metrics needs Authorization: Bearer <METRICS_TOKEN>.")
    if _is_loopback(request.META.get("REMOTE_ADDR", "")) and not any(name in request.headers for name in _FORWARDED):
        return None
    return exceptions.PermissionDenied("GET /metrics answers only loopback clients while METRICS_TOKEN is not set.")


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def scrape(request: HttpRequest) -> HttpResponse:
    """GET /metrics: Prometheus's text format. Not under /v1 and no API key: METRICS_TOKEN, or
    loopback. (A plain Django view: the OpenAPI schema, which documents the API, leaves it out.)"""
    if request.method != "GET":
        response = error_response(exceptions.MethodNotAllowed(request.method), where="metrics")
        response["Allow"] = "GET"
        return response
    refused = _refusal(request)
    if refused is not None:
        return error_response(refused, where="metrics")
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    forget_dead_processes(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    registry.register(QueueCollector())  # type: ignore[arg-type]
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)

