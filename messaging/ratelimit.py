"""Per-key limits: requests per minute, and unfinished messages at most.

The rate is a fixed one-minute window per API key, opened by the key's first request after the
previous window ended: every authenticated request counts (as OpenAI counts them), refused ones
included, and past the key's limit the answer is 429 until the window ends. A fixed window gives
the OpenAI headers their plain meaning (`x-ratelimit-reset-requests`: when the whole budget is
back) and is one atomic step per request: a Lua script in Redis when REDIS_URL is set, one
`INSERT … ON CONFLICT DO UPDATE … RETURNING` in the database otherwise (SQLite and PostgreSQL
alike), so every web process shares one count. Never the cache: LocMem is per process.

The unfinished cap (pending + processing messages of the key's owner) is checked only where
messages are created, inside the transaction that inserts the message, under a lock per owner:
counting and inserting cannot race. The messages themselves are the count, so nothing has to
follow every way a message ends (a worker's death, a cancel, an expiry, a deletion). A repeat of
an existing message_id is answered before this, and never counts.

The limiter only refuses at the door: a refused request stores nothing, and nothing accepted is
ever touched.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponseBase
from redis.exceptions import NoScriptError
from rest_framework.throttling import BaseThrottle

from messaging import metrics
from messaging.errors import RateLimited
from messaging.models import ACTIVE_STATUSES, MessageJob, RateLimitWindow

if TYPE_CHECKING:
    from messaging.auth import Owner

WINDOW_MS = 60_000
# A refusal for unfinished messages cannot know when one will finish: a client polls this often
# (each retry is one more request against its rate).
UNFINISHED_RETRY_AFTER = 1

# Seconds since the epoch; tests set it to move time rather than wait.
clock = time.time


@dataclass(frozen=True)
class Budget:
    """A key's rate budget after this request, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_ms: int  # until the window ends and the whole budget is back


def count_request(request: HttpRequest, owner: Owner, key_prefix: str) -> None:
    """Count an authenticated request against its key's rate; RateLimited past it. The budget
    rides on the request for `add_headers`, which every API response passes through."""
    limit = owner.rate_limit_rpm
    if limit is None:
        return
    now_ms = int(clock() * 1000)
    requests, started_ms = _count(key_prefix, now_ms)
    reset_ms = max(started_ms + WINDOW_MS - now_ms, 1)
    request.rate_budget = Budget(limit, max(limit - requests, 0), reset_ms)  # type: ignore[attr-defined]
    if requests > limit:
        metrics.rate_limited("requests")
        seconds = math.ceil(reset_ms / 1000)
        raise RateLimited(
            f"Rate limit reached: this API key may make {limit} requests per minute; try again in {seconds} s.",
            retry_after=seconds,
        )


def add_headers(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    """x-ratelimit-* as OpenAI's API sends them, on any response to a counted request."""
    budget: Budget | None = getattr(request, "rate_budget", None)
    if budget is not None:
        response["x-ratelimit-limit-requests"] = str(budget.limit)
        response["x-ratelimit-remaining-requests"] = str(budget.remaining)
        response["x-ratelimit-reset-requests"] = duration(budget.reset_ms)
    return response


def duration(milliseconds: int) -> str:
    """As OpenAI (Go's time.Duration) writes it: "450ms", "1s", "59.5s", "1m0s"."""
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    minutes, rest = divmod(milliseconds, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


class PerKeyRateThrottle(BaseThrottle):
    """DRF's hook for the API views (after authentication and permissions): counts the request."""

    def allow_request(self, request: Any, view: Any) -> bool:
        count_request(request._request, request.user, request.auth)
        return True  # past the limit, count_request raised: the contract's 429, not DRF's


# --- The window's store ------------------------------------------------------------------------


def _count(key_prefix: str, now_ms: int) -> tuple[int, int]:
    """(requests in the key's window including this one, the window's start), atomically."""
    if settings.REDIS_URL:
        client, sha = _redis_window()
        key = f"messaging:ratelimit:{key_prefix}"
        try:
            requests, started_ms = client.evalsha(sha, 1, key, now_ms, WINDOW_MS)
        except NoScriptError:  # Redis restarted and forgot it
            requests, started_ms = client.eval(_REDIS_WINDOW, 1, key, now_ms, WINDOW_MS)
        return int(requests), int(started_ms)
    with connection.cursor() as cursor:
        cursor.execute(_window_sql(), [key_prefix, now_ms, WINDOW_MS, WINDOW_MS])
        requests, started_ms = cursor.fetchone()
    return int(requests), int(started_ms)


# Redis runs a script alone: no other command runs between its read and its write. The key
# outlives its window (cleanup only; the window's end is decided by `now`, the web servers' clock).
_REDIS_WINDOW = """
local started = tonumber(redis.call('HGET', KEYS[1], 'started'))
local now, length = tonumber(ARGV[1]), tonumber(ARGV[2])
if started == nil or started + length <= now then
  redis.call('HSET', KEYS[1], 'started', ARGV[1], 'requests', 1)
  redis.call('PEXPIRE', KEYS[1], 2 * length)
  return {1, ARGV[1]}
end
return {redis.call('HINCRBY', KEYS[1], 'requests', 1), redis.call('HGET', KEYS[1], 'started')}
"""


@cache
def _redis_window() -> tuple[Any, str]:
    """A client (its pool shared by the process's threads) and the script's SHA1."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    return client, client.script_load(_REDIS_WINDOW)


@cache
def _window_sql() -> str:
    # One statement: PostgreSQL locks the row for it, SQLite the database. Both read the row's
    # latest committed version, so concurrent requests are counted one after another.
    table = connection.ops.quote_name(RateLimitWindow._meta.db_table)
    return (
        f"INSERT INTO {table} (key_prefix, started_ms, requests) VALUES (%s, %s, 1) "  # noqa: S608 - constant
        "ON CONFLICT (key_prefix) DO UPDATE SET "
        f"requests = CASE WHEN {table}.started_ms + %s <= excluded.started_ms THEN 1 ELSE {table}.requests + 1 END, "
        f"started_ms = CASE WHEN {table}.started_ms + %s <= excluded.started_ms THEN excluded.started_ms ELSE {table}.started_ms END "
        "RETURNING requests, started_ms"
    )


# --- Unfinished messages ------------------------------------------------------------------------


def hold_unfinished(owner: str, max_unfinished: int, message_id: str | None = None) -> None:
    """Inside the transaction that will insert the owner's next message: take the owner's lock
    and refuse (RateLimited) if the owner already has `max_unfinished` pending or processing.

    SQLite: the transaction took the database's write lock at BEGIN (IMMEDIATE), which serves.
    PostgreSQL: a transaction-level advisory lock per owner, released at commit.
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Two statements in one round trip (Django's client-side binding sends them as one
            # simple query). Not one statement: a statement's snapshot is taken when it starts,
            # before the lock is granted, and would miss the messages its holder just inserted.
            cursor.execute(f"SELECT pg_advisory_xact_lock(%s); {_unfinished_sql()}", [_lock_id(owner), owner, max_unfinished])
            cursor.nextset()
        else:
            cursor.execute(_unfinished_sql(), [owner, max_unfinished])
        (unfinished,) = cursor.fetchone()
    if unfinished < max_unfinished:
        return
    if message_id is not None and MessageJob.objects.filter(owner=owner, message_id=message_id).exists():
        return  # a repeat that raced its first request here: its insert fails and it answers as a repeat
    metrics.rate_limited("unfinished")
    raise RateLimited(
        f"Too many unfinished messages: this API key allows {max_unfinished} pending or processing "
        "messages for its owner; try again when one has finished.",
        retry_after=UNFINISHED_RETRY_AFTER,
    )


@cache
def _unfinished_sql() -> str:
    # Counting stops at the cap: its cost is bounded by the cap, not by the owner's backlog. The
    # statuses are literals, as in the partial index job_owner_unfinished: SQLite uses a partial
    # index only when the query's own text implies its condition (with parameters it walked the
    # owner's whole history, 1 ms for 5,000 messages).
    table = connection.ops.quote_name(MessageJob._meta.db_table)
    statuses = ", ".join(f"'{status}'" for status in ACTIVE_STATUSES)
    return (
        f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} WHERE owner = %s AND status IN ({statuses}) LIMIT %s) unfinished"  # noqa: S608 - constant
    )


def _lock_id(owner: str) -> int:
    """A signed 64-bit advisory lock id for the owner (a collision only makes two owners wait
    for each other)."""
    digest = hashlib.blake2b(f"messaging.unfinished:{owner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
