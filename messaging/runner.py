"""The runner: many messages in flight in one process, on one asyncio event loop.

A model call is almost all waiting, so each process that runs messages (a django-q2 worker,
or a web process answering synchronous requests) runs them as asyncio tasks on one event loop
in a thread of its own, up to MESSAGING_CONCURRENCY at once: a message waiting on its model
costs a task and its buffers, kilobytes, not a process or a thread. Providers are async and
share one HTTP client per upstream (messaging/providers).

The database is reached through a small executor (MESSAGING_DB_CONNECTIONS threads, so as many
connections), in rounds shared by every message of the process:

- flush, every MESSAGING_FLUSH_INTERVAL: the new events of every message, and the ends of the
  finished ones, in one transaction (`jobs.record`, group commit). A message whose write is
  refused is no longer ours (cancelled, or taken over): its task is cancelled.
- check, every MESSAGING_CHECK_INTERVAL: one query says which messages are still ours; the
  others stop at once, even while their model is silent, and their upstream request closes
  with them. Deadlines are asyncio timeouts on each message's task.
- renew, every MESSAGING_RECOVERY_INTERVAL: one UPDATE keeps every lease, so a live process's
  messages never look like a dead one's. A worker also writes its heartbeat and, with free
  slots, claims work nobody woke it for (a lost token, a lease that ran out).

A worker's runner also sends the webhook deliveries that are due (messaging/webhooks.py), each
in a task of its own, at once when one of its messages ends and every MESSAGING_WEBHOOK_INTERVAL.

A worker's runner claims for itself (`jobs.claim`: highest priority first, messages whose
worker died included) when a django-q2 token arrives, when a slot frees up under a backlog,
and at every renew round. When django-q2 stops the worker (SIGTERM to the cluster) its main
thread ends; the runner then stops claiming, lets its messages finish for up to
MESSAGING_DRAIN_SECONDS and hands the rest back to the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import timedelta
from queue import SimpleQueue
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections, connection, connections
from django.utils import timezone

from messaging import catalog, jobs, metrics, patterns, queue, toolloop, webhooks
from messaging.events import EventRecorder, ResultTooLarge
from messaging.mcp_client import McpError, enabled_servers
from messaging.middleware import log_fields, message_context
from messaging.models import MessageJob, Status, WorkerHeartbeat
from messaging.providers.base import ProviderError
from messaging.providers.http import close_clients
from messaging.serializers import merge_secrets

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_FAILED = {"type": "api_error", "message": "The service failed while running this message."}
# Messages one claim takes at most: a worker with hundreds of free slots leaves some of a
# burst to the others.
CLAIM_BATCH = 32
# Webhook deliveries a worker process sends at once.
WEBHOOKS_IN_FLIGHT = 64
TO_THREAD_THREADS = 4


@dataclass(eq=False)
class Running:
    """One message in flight: its claimed attempt, its task, and its events not written yet."""

    job: MessageJob
    recorder: EventRecorder | None = None
    task: asyncio.Task[None] | None = None
    end: jobs.End | None = None  # set when it has ended, until the writer has recorded it
    written: asyncio.Future[None] | None = None
    stopped_by: str | None = None  # "superseded" or "handed back": why its task was cancelled

    @property
    def attempt(self) -> int:
        return self.job.attempts


class Runner:
    """Runs claimed messages on an event loop of its own. `claims`: it also claims (a worker)."""

    def __init__(self, name: str, *, claims: bool, slots: int | None, keep_connections: bool = True):
        self.name = name
        self.claims = claims
        self.slots = slots
        self._keep_connections = keep_connections
        self._running: dict[int, Running] = {}
        self._has_room = threading.Event()
        self._has_room.set()
        self._db = _Threads(settings.MESSAGING_DB_CONNECTIONS, "messaging-db", at_exit=connections.close_all)
        self._loop = _new_event_loop()
        # asyncio.to_thread's threads: CPU-bound steps (schema checks, examples) off the loop.
        self._loop.set_default_executor(_Threads(TO_THREAD_THREADS, "messaging-cpu"))
        self._flush_soon: asyncio.Event | None = None
        self._close_soon: asyncio.Event | None = None
        self._claim_lock: asyncio.Lock | None = None
        self._refill: asyncio.Task[Any] | None = None
        self._webhooks_soon: asyncio.Event | None = None
        self._sending: set[asyncio.Task[None]] = set()  # webhook deliveries in flight
        self._backlog = False
        self._stopping = False
        self._closing = False
        self._stopped = threading.Event()
        # A worker's runner outlives its main thread to drain (not a daemon); a web process's
        # leaves its messages to their leases when the server exits.
        self._thread = threading.Thread(target=self._main, name="messaging-runner", daemon=not claims)

    # --- from other threads ---------------------------------------------------------------------

    def start(self) -> Runner:
        ready = threading.Event()
        self._loop.call_soon(ready.set)
        self._thread.start()
        ready.wait()
        return self

    def run(self, job: MessageJob) -> Future[None]:
        """Run a message already claimed by this process (the synchronous endpoint's)."""
        return asyncio.run_coroutine_threadsafe(self._run_claimed(job), self._loop)

    def take_token(self, wait: float) -> str:
        """A django-q2 token: claim work once a slot is free, waiting at most `wait` seconds so
        that a full worker leaves tokens to the others. Returns what it claimed, or why not."""
        if not self._has_room.wait(wait):
            return "busy"
        claimed = asyncio.run_coroutine_threadsafe(self._claim(), self._loop).result()
        return " ".join(claimed) or "idle"

    def stop_soon(self, job_pk: int) -> None:
        """Stop a message of this process now (it was cancelled here), not at the next check."""
        self._loop.call_soon_threadsafe(self._supersede, job_pk)

    def close(self) -> None:
        """Stop as a worker stops (drain, then hand back), and wait until the loop has ended."""
        self._closing = True
        if self._close_soon is not None:
            self._loop.call_soon_threadsafe(self._close_soon.set)
        self._stopped.wait()

    # --- the loop ---------------------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except Exception:
            logger.exception("the runner of %s stopped", self.name)
        finally:
            self._db.shutdown(wait=True)
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
            self._stopped.set()
        if self.claims and not self._should_stop():
            # A worker process without its runner would take tokens and run nothing: end it,
            # and django-q2 starts another in its place.
            logger.critical("the runner of %s failed; the worker process exits", self.name)
            os._exit(1)

    async def _serve(self) -> None:
        self._flush_soon = asyncio.Event()
        self._close_soon = asyncio.Event()
        self._claim_lock = asyncio.Lock()
        self._webhooks_soon = asyncio.Event()
        rounds = [
            asyncio.create_task(self._every(settings.MESSAGING_FLUSH_INTERVAL, self._flush, wake=self._flush_soon)),
            asyncio.create_task(self._every(settings.MESSAGING_CHECK_INTERVAL, self._check)),
            asyncio.create_task(self._every(settings.MESSAGING_RECOVERY_INTERVAL, self._renew, first=0.0)),
        ]
        if self.claims:
            rounds.append(asyncio.create_task(self._every(settings.MESSAGING_WEBHOOK_INTERVAL, self._deliver_webhooks, wake=self._webhooks_soon)))
        try:
            while not self._should_stop():
                await _woken(self._close_soon, settings.MESSAGING_CHECK_INTERVAL)
            await self._drain()
        finally:
            # Deliveries in flight are cut: each is tried again once its claim runs out.
            for task in [*rounds, *self._sending]:
                task.cancel()
            await asyncio.gather(*rounds, *self._sending, return_exceptions=True)
            await close_clients()

    def _should_stop(self) -> bool:
        # django-q2 ends a worker process by ending its main thread's task loop.
        return self._closing or (self.claims and not threading.main_thread().is_alive())

    async def _every(self, interval: float, work: Callable[[], Any], *, wake: asyncio.Event | None = None, first: float | None = None) -> None:
        delay = interval if first is None else first
        while True:
            if wake is None:
                await asyncio.sleep(delay)
            else:
                await _woken(wake, delay)
                wake.clear()
            delay = interval
            try:
                await work()
            except Exception:
                # The database may be briefly away: the next round tries again.
                logger.exception("runner round %s failed", getattr(work, "__name__", work))

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._db, _with_connection, self._keep_connections, function, *args)

    # --- claiming ---------------------------------------------------------------------------------

    async def _claim(self) -> list[str]:
        assert self._claim_lock is not None
        async with self._claim_lock:
            free = CLAIM_BATCH if self.slots is None else min(CLAIM_BATCH, self.slots - len(self._running))
            if self._stopping or free <= 0:
                return []
            claimed = await self._call(jobs.claim, free)
            self._backlog = len(claimed) == free
            for job in claimed:
                self._start(job)
            if self._backlog:
                # More may wait: wake another worker in turn (one waiting token is enough).
                await self._call(queue.wake_a_worker)
            return [job.message_id for job in claimed]

    def _refill_soon(self) -> None:
        """A slot freed up while work was waiting: claim the next message by priority now."""
        if self.claims and self._backlog and not self._stopping and (self._refill is None or self._refill.done()):
            self._refill = asyncio.ensure_future(self._claim_logged())

    async def _claim_logged(self) -> None:
        try:
            await self._claim()
        except Exception:
            logger.exception("claiming failed; the next round tries again")

    # --- running ----------------------------------------------------------------------------------

    async def _run_claimed(self, job: MessageJob) -> None:
        running = self._start(job)
        assert running.task is not None
        await asyncio.shield(running.task)

    def _start(self, job: MessageJob) -> Running:
        running = Running(job)
        self._running[job.pk] = running
        if self.slots is not None and len(self._running) >= self.slots:
            self._has_room.clear()
        # Which process runs which attempt: what an operator (or a test) needs after a crash.
        logger.info(
            "message %s attempt %s started in worker process %s", job.message_id, job.attempts, os.getpid(),
            extra=log_fields(job, event="claimed", attempt=job.attempts),
        )
        # In a context of its own: whatever it logs (provider retries, MCP servers, a failure)
        # names the message and the request that submitted it.
        running.task = self._loop.create_task(self._run(running), context=message_context(job))
        return running

    async def _run(self, running: Running) -> None:
        try:
            try:
                running.recorder = EventRecorder(token_deltas=bool(running.job.request.get("stream")))
                end = await self._answer(running)
            except asyncio.CancelledError:
                if running.stopped_by is None:
                    raise  # the runner itself is going away
                return  # superseded or handed back: whoever did that wrote its state
            except Exception:
                logger.exception("message %s failed in the service", running.job.message_id)
                result = running.recorder.builder.result() if running.recorder else None
                end = jobs.End(Status.ERROR, result=result, error=SERVICE_FAILED)
            await self._finish(running, end)
        finally:
            self._forget(running)

    async def _answer(self, running: Running) -> jobs.End:
        started, before_first_token = time.monotonic(), True
        job = running.job
        spec = catalog.get_model(job.model)
        if spec is None:
            return jobs.End(Status.ERROR, error={"type": "api_error", "message": f"The model {job.model!r} is no longer configured."})
        request = merge_secrets(job.request, job.secrets)
        recorder = running.recorder
        assert recorder is not None
        # A rescued message with tools on the server resumes from what was recorded: a tool
        # call whose result is recorded is not made again.
        recorded = await self._call(jobs.recorded_result, job.pk) if job.attempts > 1 and enabled_servers(request) else None
        # The deadline counts from the first start, so a rescued message does not get a fresh one.
        assert job.started_at is not None
        remaining = job.started_at.timestamp() + settings.MESSAGING_JOB_TIMEOUT - time.time()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                # aclosing: a failure in this loop's body (ResultTooLarge) closes the upstream
                # request at once, not when the generator is collected.
                events = toolloop.stream(catalog.provider_for(spec), request, spec, message_id=job.message_id, recorded=recorded)
                async with contextlib.aclosing(events) as stream:
                    async for event in stream:
                        if before_first_token and event.get("type") == "content_block_delta":
                            before_first_token = False
                            metrics.first_token(job.model, time.monotonic() - started)
                        if recorder.add(event):
                            self._wake_writer()
        except TimeoutError:
            return _failed(recorder, "timeout_error", f"The message ran longer than {settings.MESSAGING_JOB_TIMEOUT} seconds.")
        except ProviderError as exc:
            return _failed(recorder, exc.error_type, str(exc))
        except McpError as exc:
            return _failed(recorder, "mcp_error", str(exc))
        except ResultTooLarge as exc:
            return _failed(recorder, "invalid_output_error", str(exc))
        result = recorder.builder.result()
        # A schema check may take a while (bounded by patterns' step budget): not on the loop.
        problem = await asyncio.to_thread(output_problem, request, result)
        if problem:
            return jobs.End(Status.FAILED, result=result, error={"type": "invalid_output_error", "message": problem})
        return jobs.End(Status.COMPLETED, result=result)

    async def _finish(self, running: Running, end: jobs.End) -> None:
        """Hand the end to the writer, and wait until it is recorded (or refused)."""
        running.written = self._loop.create_future()
        running.end = end
        self._wake_writer()
        await running.written

    def _forget(self, running: Running) -> None:
        if self._running.get(running.job.pk) is running:
            del self._running[running.job.pk]
        self._has_room.set()
        self._refill_soon()

    def _supersede(self, job_pk: int) -> None:
        running = self._running.get(job_pk)
        if running is None or running.stopped_by is not None:
            return
        running.stopped_by = "superseded"
        if running.end is not None:
            assert running.written is not None
            if not running.written.done():
                running.written.set_result(None)  # its end was refused: nothing more to do
        elif running.task is not None:
            running.task.cancel()

    def _wake_writer(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.set()

    # --- the rounds -------------------------------------------------------------------------------

    async def _flush(self) -> None:
        now = time.monotonic()
        writes: list[tuple[Running, jobs.Write]] = []
        for running in list(self._running.values()):
            recorder = running.recorder
            if running.stopped_by is not None:
                continue
            job = running.job
            if running.end is not None:
                rest = recorder.rest() if recorder is not None else []
                write = jobs.Write(job.pk, running.attempt, rest, running.end, job.correlation_id)
            elif recorder is not None:
                events = recorder.take(now)
                if not events:
                    continue
                write = jobs.Write(job.pk, running.attempt, events)
            else:
                continue
            writes.append((running, write))
        if not writes:
            return
        try:
            lost = await self._call(jobs.record, [write for _, write in writes])
        except BaseException:
            for running, write in writes:
                if running.recorder is not None:
                    running.recorder.put_back(write.events)  # written with the next flush
            raise
        for running, write in writes:
            if write.job_pk in lost:
                self._supersede(write.job_pk)
            elif running.written is not None and write.end is not None and not running.written.done():
                running.written.set_result(None)
                if self._webhooks_soon is not None:
                    self._webhooks_soon.set()  # its webhooks, if any, go out now, not at the next round

    async def _check(self) -> None:
        mine = [(pk, running.attempt) for pk, running in self._running.items() if running.stopped_by is None]
        if not mine:
            return
        ours = await self._call(jobs.still_ours, mine)
        for pk, _ in mine:
            if pk not in ours:
                self._supersede(pk)

    async def _renew(self) -> None:
        mine = [(pk, running.attempt) for pk, running in self._running.items() if running.stopped_by is None]
        if mine:
            # Before anything is claimed, so that ours is never taken for a dead worker's.
            await self._call(jobs.renew_leases, mine)
        if self.claims:
            await self._call(beat, self.name)
            await self._claim()

    async def _deliver_webhooks(self) -> None:
        """Send the webhook deliveries that are due, each in a task of its own: a slow receiver
        holds nothing but its own delivery."""
        free = WEBHOOKS_IN_FLIGHT - len(self._sending)
        if self._stopping or free <= 0:
            return
        for due in await self._call(webhooks.claim_due, free):
            task = asyncio.ensure_future(self._send_webhook(due))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_webhook(self, due: webhooks.Due) -> None:
        outcome = await webhooks.send(due)
        try:
            await self._call(webhooks.record_attempt, due.pk, outcome)
        except Exception:
            # Not recorded: its claim runs out and it is sent again (at least once).
            logger.exception("recording webhook delivery %s failed", due.webhook_id)

    async def _drain(self) -> None:
        self._stopping = True
        self._has_room.clear()
        deadline = time.monotonic() + settings.MESSAGING_DRAIN_SECONDS
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(min(settings.MESSAGING_CHECK_INTERVAL, 0.1))
        unfinished = [running for running in self._running.values() if running.end is None and running.stopped_by is None]
        for running in unfinished:
            running.stopped_by = "handed back"
            assert running.task is not None
            running.task.cancel()
        await asyncio.gather(*(running.task for running in unfinished if running.task), return_exceptions=True)
        await self._flush()  # the ends of those that finished meanwhile
        if unfinished:
            handed = await self._call(jobs.hand_back, [(running.job.pk, running.attempt) for running in unfinished])
            logger.warning("worker stopping: %s unfinished message(s) handed back to the queue", handed)


async def _woken(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set, or `timeout` seconds at most."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)


def _failed(recorder: EventRecorder, error_type: str, message: str) -> jobs.End:
    # What the model produced before the failure stays: the result is what its events add up to.
    return jobs.End(Status.FAILED, result=recorder.builder.result(), error={"type": error_type, "message": message})


def _with_connection(keep: bool, function: Callable[..., T], *args: Any) -> T:
    """Run on an executor thread as a request would: a broken or expired connection is replaced
    before and after (PostgreSQL's pool gets its connection back; SQLite's persists unless the
    runner is short-lived)."""
    close_old_connections()
    try:
        return function(*args)
    finally:
        if keep:
            close_old_connections()
        else:
            connection.close()


class _Threads(Executor):
    """A fixed set of threads taking work from a queue, like ThreadPoolExecutor except in one
    way that matters here: it still takes work while the interpreter shuts down. A worker drains
    its messages after django-q2 ended its main thread, and from then on ThreadPoolExecutor
    refuses every submission ("cannot schedule new futures after shutdown")."""

    def __init__(self, count: int, name: str, at_exit: Callable[[], object] | None = None):
        self._work: SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = SimpleQueue()
        self._at_exit = at_exit
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{number}", daemon=True) for number in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._work.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return future

    def _serve(self) -> None:
        try:
            while (item := self._work.get()) is not None:
                future, fn, args = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
        finally:
            if self._at_exit is not None:
                self._at_exit()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def beat(name: str) -> None:
    """This process's heartbeat, which /readyz reads."""
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(name=name, defaults={"seen_at": now})
    WorkerHeartbeat.objects.filter(seen_at__lt=now - timedelta(days=1)).delete()


def output_problem(request: dict[str, Any], result: dict[str, Any] | None) -> str | None:
    """A `json_schema` response format is a promise: check the answer keeps it."""
    response_format = request.get("response_format") or {}
    if response_format.get("type") != "json_schema" or result is None or result.get("stop_reason") != "end_turn":
        return None
    text = "".join(block.get("text", "") for block in result["content"] if block.get("type") == "text")
    try:
        value = json.loads(text)
    except ValueError:
        return "The model's answer is not JSON, as response_format requires."
    except RecursionError:
        return "The model's answer is JSON nested too deeply to read."
    try:
        error = patterns.first_error(response_format["json_schema"]["schema"], value)
    except patterns.Unchecked as exc:  # out of steps, or a $ref that leads nowhere
        return f"The model's answer could not be checked against response_format's schema: {exc}."
    if error is not None:
        return f"The model's answer does not match response_format's schema: {error.message}"
    return None


# --- one runner per process -----------------------------------------------------------------------

_lock = threading.Lock()
_runners: dict[str, Runner] = {}


def _process_name(role: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + ("" if role == "worker" else f":{role}")


def _runner(role: str) -> Runner:
    # Per process and created on first use, never at import: django-q2 forks its workers.
    key = f"{role}:{os.getpid()}"
    with _lock:
        runner = _runners.get(key)
        if runner is None:
            claims = role == "worker"
            slots = settings.MESSAGING_CONCURRENCY if claims else None
            runner = _runners[key] = Runner(_process_name(role), claims=claims, slots=slots).start()
        return runner


def on_worker_spawn(sender: object, **kwargs: object) -> None:
    worker_runner()


def worker_runner() -> Runner:
    """The runner of this django-q2 worker process: it claims messages."""
    return _runner("worker")


def web_runner() -> Runner:
    """The runner of this web process: it runs the synchronous endpoint's messages."""
    return _runner("web")


def run_one() -> str:
    """Claim the next message and run it to its end, on a runner of its own that stops after:
    for tests and the shell (`manage.py shell`), where no worker process runs. Returns its
    message_id, or "idle"."""
    job = jobs.claim_next()
    if job is None:
        return "idle"
    runner = Runner(_process_name("once"), claims=False, slots=1, keep_connections=False).start()
    try:
        runner.run(job).result()
    finally:
        runner.close()
    return job.message_id
