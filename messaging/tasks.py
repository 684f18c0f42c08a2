"""What django-q2 runs.

django-q2 has no priorities and no FIFO guarantee, so its tasks carry no message: each one is
a token that claims the highest-priority pending message when a worker gets to it. Every
accepted message queues one token; a message rescued from a dead worker queues one more, and
so does a pending message whose token was lost (see `jobs.requeue_lost`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from functools import cache
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from django_q.brokers import Broker, get_broker
from django_q.models import OrmQ
from django_q.tasks import async_task

from messaging import catalog, jobs, patterns, worker
from messaging.events import EventRecorder, ResultTooLarge
from messaging.models import MessageJob, Status
from messaging.providers.base import ProviderError
from messaging.serializers import merge_secrets

logger = logging.getLogger(__name__)

# With the ORM broker a token is a row in the same database, written in the same transaction
# as its message; with Redis it is pushed after the message is committed.
QUEUE_IN_DATABASE = "orm" in settings.Q_CLUSTER


@cache
def shared_broker() -> Broker:
    # One broker per process: the Redis broker otherwise opens a connection per enqueue.
    return get_broker()


def enqueue_token(rescue: tuple[int, int] | None = None) -> None:
    async_task("messaging.tasks.process_next", rescue, broker=shared_broker())


def queue_is_empty() -> bool:
    """No token waits in the broker's queue (those a cluster has prefetched are not in it)."""
    broker = shared_broker()
    if QUEUE_IN_DATABASE:
        # The ORM broker's queue_size() counts every row: a full count per watchdog round
        # under a backlog of a million. One row is enough to know.
        return not OrmQ.objects.using(settings.Q_CLUSTER["orm"]).filter(key=broker.list_key, lock__lte=timezone.now()).exists()
    return not broker.queue_size()


def process_next(rescue: tuple[int, int] | list[int] | None = None) -> str:
    """Claim a message and run it to a terminal status. `rescue` is (job pk, attempt) of a
    message whose worker died."""
    job = jobs.claim_rescued(*rescue) if rescue else jobs.claim_next()
    if job is None:
        return "idle"
    # Which process runs which attempt: what an operator (or a test) needs after a crash.
    logger.info("message %s attempt %s started in worker process %s", job.message_id, job.attempts, os.getpid())
    with worker.running(job.pk, job.attempts):
        run(job)
    return job.message_id


class MessageTimeout(Exception):
    pass


SERVICE_FAILED = {"type": "api_error", "message": "The service failed while running this message."}


def run(job: MessageJob) -> None:
    """Run a claimed message to a terminal status. Whatever fails, the message ends: a failure
    before the model is called would otherwise leave it `processing` until its lease ran out
    (and a synchronous client waiting as long)."""
    try:
        _run(job)
    except Exception:
        logger.exception("message %s failed in the service", job.message_id)
        jobs.fail(job, job.attempts, Status.ERROR, SERVICE_FAILED)


def _run(job: MessageJob) -> None:
    attempt = job.attempts
    spec = catalog.get_model(job.model)
    if spec is None:
        jobs.fail(job, attempt, Status.ERROR, {"type": "api_error", "message": f"The model {job.model!r} is no longer configured."})
        return
    request = merge_secrets(job.request, job.secrets)
    recorder = EventRecorder(job.pk, attempt, token_deltas=bool(request.get("stream")))
    # The deadline counts from the first start, so a rescued message does not get a fresh one.
    assert job.started_at is not None
    deadline = job.started_at.timestamp() + settings.MESSAGING_JOB_TIMEOUT
    watch = Watch(job.pk, attempt, deadline)
    stream = catalog.provider_for(spec).stream(request, spec, message_id=job.message_id, cancelled=watch.cancelled)
    try:
        for event in stream:
            recorder.add(event)
            if time.time() > deadline:
                raise MessageTimeout
        if watch.out_of_time:
            raise MessageTimeout  # the provider stopped because the watch told it to
        if watch.cancelled.is_set():
            raise jobs.Superseded  # it stopped because the message is no longer ours: not an answer
        recorder.flush()
        result = recorder.builder.result()
        problem = _output_problem(request, result)
        if problem:
            jobs.fail(job, attempt, Status.FAILED, {"type": "invalid_output_error", "message": problem}, result)
        else:
            jobs.complete(job, attempt, result)
    except jobs.Superseded:
        pass  # cancelled or taken over: whoever did that wrote the message's final state
    except MessageTimeout:
        _end_with(job, attempt, recorder, Status.FAILED, "timeout_error",
                  f"The message ran longer than {settings.MESSAGING_JOB_TIMEOUT} seconds.")
    except ProviderError as exc:
        _end_with(job, attempt, recorder, Status.FAILED, exc.error_type, str(exc))
    except ResultTooLarge as exc:
        _end_with(job, attempt, recorder, Status.FAILED, "invalid_output_error", str(exc))
    except Exception:
        logger.exception("message %s failed in the service", job.message_id)
        _end_with(job, attempt, recorder, Status.ERROR, SERVICE_FAILED["type"], SERVICE_FAILED["message"])
    finally:
        watch.stop()
        stream.close()


class Watch:
    """Tells the provider, through `cancelled`, the moment its message stops being this
    worker's (cancelled, or taken over) or runs out of time, even while the model is silent:
    events alone would only be checked when the model next says something."""

    def __init__(self, job_pk: int, attempt: int, deadline: float):
        self.cancelled = threading.Event()
        self.out_of_time = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(job_pk, attempt, deadline), name="messaging-watch", daemon=True)
        self._thread.start()

    def _run(self, job_pk: int, attempt: int, deadline: float) -> None:
        try:
            while not self._done.wait(settings.MESSAGING_CHECK_INTERVAL):
                if time.time() > deadline:
                    self.out_of_time = True
                    self.cancelled.set()
                    return
                try:
                    ours = MessageJob.objects.filter(pk=job_pk, status=Status.PROCESSING, attempts=attempt).exists()
                except Exception:
                    continue  # the database may be briefly away; the worker's own writes will tell
                finally:
                    close_old_connections()
                if not ours:
                    self.cancelled.set()
                    return
        finally:
            connection.close()  # this thread's own connection

    def stop(self) -> None:
        self._done.set()


def _end_with(job: MessageJob, attempt: int, recorder: EventRecorder, status: str, error_type: str, message: str) -> None:
    try:
        recorder.flush()  # what the model produced before the failure stays visible
    except jobs.Superseded:
        return
    # Everything is recorded now, so the result is what the events add up to.
    jobs.fail(job, attempt, status, {"type": error_type, "message": message}, recorder.builder.result())


def _output_problem(request: dict[str, Any], result: dict[str, Any] | None) -> str | None:
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
