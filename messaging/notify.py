"""Wake-ups for streams: "message N has new events".

The database stays the single source of truth; a notification only tells a waiting stream to
look again. Whoever writes events calls `publish()` inside the writing transaction:

- with Redis configured: PUBLISH on the `messaging:events` channel after commit;
- with PostgreSQL (no Redis): `pg_notify`, which PostgreSQL delivers at commit;
- always: a wake-up of this process's own streams after commit (the synchronous endpoint
  runs its message inside the web process).

Each web process runs one `Hub` on its event loop: one LISTEN connection or one Redis
subscription (SQLite: one short poll over the watched messages), fanned out in memory to every
stream that waits. An idle stream holds an asyncio.Event, not a database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, transaction

logger = logging.getLogger(__name__)

CHANNEL = "messaging_events"  # PostgreSQL channel names are identifiers
REDIS_CHANNEL = "messaging:events"


def transport() -> str:
    if settings.REDIS_URL:
        return "redis"
    if connection.vendor == "postgresql":
        return "postgresql"
    return "poll"


@cache
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL)


def publish(job_pks: list[int]) -> None:
    """Announce new events of `job_pks`. Call inside the transaction that wrote them: one
    notification for all of them (a runner's flush covers hundreds of messages)."""
    if not job_pks:
        return
    kind = transport()
    for payload in _payloads(job_pks):
        if kind == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])
        elif kind == "redis":
            transaction.on_commit(lambda payload=payload: _publish_redis(payload))
    transaction.on_commit(lambda: hub.wake_threadsafe(job_pks))


def _payloads(job_pks: list[int]) -> list[str]:
    """Comma-separated pks, each payload under PostgreSQL's 8,000-byte limit."""
    payloads, current = [], ""
    for pk in job_pks:
        if len(current) > 7000:
            payloads.append(current)
            current = ""
        current = f"{current},{pk}" if current else str(pk)
    return [*payloads, current]


def _parse(payload: str | bytes) -> list[int]:
    if isinstance(payload, bytes):
        payload = payload.decode()
    return [int(pk) for pk in payload.split(",") if pk]


def _publish_redis(payload: str) -> None:
    try:
        _redis().publish(REDIS_CHANNEL, payload)
    except Exception as exc:
        # Only a wake-up: streams still re-read at their next ping.
        logger.warning("could not publish a stream wake-up: %s", type(exc).__name__)


def in_executor(function: Any) -> Any:
    """Run `function` on the loop's shared executor threads, as a request would: the connection
    is checked before and released after (returned to PostgreSQL's pool; SQLite's persists)."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            # With PostgreSQL's pool this hands the connection back; SQLite's stays open.
            close_old_connections()

    return sync_to_async(checked, thread_sensitive=False)


class Hub:
    """This process's listener, fanning wake-ups out to the streams that wait for them."""

    def __init__(self) -> None:
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_pk: int) -> AsyncIterator[asyncio.Event]:
        """An event set whenever `job_pk` may have new events. Set it up BEFORE reading, so a
        write between the read and the wait is not missed."""
        self._ensure_listening()
        woken = asyncio.Event()
        self._waiters.setdefault(job_pk, set()).add(woken)
        try:
            yield woken
        finally:
            waiters = self._waiters.get(job_pk)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[job_pk]

    def wake(self, job_pks: list[int]) -> None:
        for job_pk in job_pks:
            for woken in self._waiters.get(job_pk, ()):
                woken.set()

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()

    def wake_threadsafe(self, job_pks: list[int]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed() and self._waiters:
            loop.call_soon_threadsafe(self.wake, job_pks)

    def _ensure_listening(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            listen = {"redis": self._listen_redis, "postgresql": self._listen_postgresql}.get(transport(), self._poll)
            self._task = loop.create_task(self._run(listen), name="messaging-hub")

    async def _run(self, listen: Any) -> None:
        delay = 0.1
        while True:
            try:
                await listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("stream listener lost its connection (%s); reconnecting", type(exc).__name__)
            # Whatever was announced while we were away: every stream looks again.
            self.wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen_redis(self) -> None:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(REDIS_CHANNEL)
            self.wake_all()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self.wake(_parse(message["data"]))
        finally:
            await pubsub.aclose()
            await client.aclose()

    async def _listen_postgresql(self) -> None:
        import psycopg

        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        async with await psycopg.AsyncConnection.connect(autocommit=True, **params) as listener:
            await listener.execute(f"LISTEN {CHANNEL}")
            self.wake_all()
            async for notice in listener.notifies():
                self.wake(_parse(notice.payload))

    async def _poll(self) -> None:
        """SQLite has no notifications: one query per interval over every watched message."""
        from messaging.models import MessageJob

        seen: dict[int, int] = {}

        def last_sequences(pks: list[int]) -> dict[int, int]:
            return dict(MessageJob.objects.filter(pk__in=pks).values_list("pk", "last_sequence"))

        read = in_executor(last_sequences)
        while True:
            await asyncio.sleep(settings.MESSAGING_POLL_INTERVAL)
            pks = list(self._waiters)
            if not pks:
                seen.clear()
                continue
            current = await read(pks)
            for pk, last in current.items():
                if seen.get(pk) != last:
                    seen[pk] = last
                    self.wake([pk])


hub = Hub()
