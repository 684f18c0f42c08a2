"""The status machine of a message, in one place.

    pending ──► processing ──► completed | failed | error
       └─────────────┴──────► cancelled

Every transition is a conditional update (`filter(pk=…, status__in=…).update(…)`) written in
the same transaction as its `status` event, so a race has exactly one winner and the stream
never shows an event after a terminal status. A worker's writes are also fenced by `attempts`:
the value it claimed with. A worker that lost its message (cancelled, or taken over after its
lease ran out) fails its next write with `Superseded` and stops.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from messaging import notify
from messaging.errors import Conflict
from messaging.models import ACTIVE_STATUSES, MessageEvent, MessageJob, Status
from messaging.serializers import CheckedRequest, split_secrets

logger = logging.getLogger(__name__)

# Cancelling "select all" in the admin may meet millions of rows: one update per chunk.
CANCEL_CHUNK = 500
# One watchdog round queues at most this many tokens for messages whose token was lost.
REQUEUE_BATCH = 100


class Superseded(Exception):
    """The message is no longer this worker's: cancelled, or taken over by another worker."""


def status_event(status: str, correlation_id: str | None = None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "status", "status": status, **extra}
    if correlation_id is not None:
        event["correlation_id"] = correlation_id
    return event


def _lease() -> Any:
    return timezone.now() + timedelta(seconds=settings.MESSAGING_LEASE_SECONDS)


def _write(job_pk: int, match: Q, update: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """Update the message if it still matches, and append `events` numbered after its last one.

    Returns False, writing nothing, when the message no longer matches. The update locks the
    row (PostgreSQL) or the database (SQLite, IMMEDIATE), so numbering cannot race.
    """
    with transaction.atomic():
        updated = MessageJob.objects.filter(match, pk=job_pk).update(
            last_sequence=F("last_sequence") + len(events), **update
        )
        if not updated:
            return False
        notify.publish(job_pk)  # a wake-up for streams, delivered when this commits
        if events:
            last = MessageJob.objects.filter(pk=job_pk).values_list("last_sequence", flat=True).get()
            first = last - len(events) + 1
            MessageEvent.objects.bulk_create(
                MessageEvent(job_id=job_pk, sequence=first + offset, type=event["type"], data=event)
                for offset, event in enumerate(events)
            )
    return True


# --- Accepting ---------------------------------------------------------------------------------


def accept(owner: str, checked: CheckedRequest, message_id: str | None = None) -> tuple[MessageJob, bool]:
    """Store a valid request and queue it, in one transaction. Returns (job, created).

    A repeated `message_id` with the same body returns the existing message (created=False);
    with a different body it is a conflict.
    """
    from messaging import tasks

    request_hash = checked.request_hash()
    if message_id is not None:
        existing = MessageJob.objects.filter(owner=owner, message_id=message_id).first()
        if existing is not None:
            return _same_request(existing, request_hash), False

    fields = _new_message(owner, checked, request_hash)
    if message_id is not None:
        fields["message_id"] = message_id
    try:
        with transaction.atomic():
            job = MessageJob.objects.create(**fields)
            MessageEvent.objects.create(
                job=job, sequence=1, type="status", data=status_event(Status.PENDING, job.correlation_id)
            )
            if tasks.QUEUE_IN_DATABASE:
                tasks.enqueue_token()
    except IntegrityError:
        # Two requests raced with the same message_id; the first one stored wins.
        existing = MessageJob.objects.filter(owner=owner, message_id=message_id).first()
        if existing is None:
            raise
        return _same_request(existing, request_hash), False

    if not tasks.QUEUE_IN_DATABASE:
        try:
            tasks.enqueue_token()
        except Exception:
            # The broker is down: take the message back, so that a 503 truly means "not accepted".
            job.delete()
            raise
    return job, True


def _new_message(owner: str, checked: CheckedRequest, request_hash: str) -> dict[str, Any]:
    request = checked.normalized()
    public, secrets = split_secrets(request)
    return {
        "owner": owner,
        "model": request["model"],
        "priority": request["priority"],
        "correlation_id": request.get("correlation_id"),
        "request": public,
        "secrets": secrets,
        "request_hash": request_hash,
        "warnings": checked.warnings,
        "last_sequence": 1,
    }


def accept_and_claim(owner: str, checked: CheckedRequest) -> MessageJob:
    """For the synchronous endpoint: store the message already claimed by the web process that
    runs it, with no token, so it never waits in the queue. Should that process die, the lease
    runs out and a worker takes the message up like any other."""
    fields = _new_message(owner, checked, checked.request_hash())
    now = timezone.now()
    fields.update(status=Status.PROCESSING, attempts=1, started_at=now, lease_expires_at=_lease(), last_sequence=2)
    with transaction.atomic():
        job = MessageJob.objects.create(**fields)
        MessageEvent.objects.bulk_create(
            [
                MessageEvent(job=job, sequence=1, type="status", data=status_event(Status.PENDING, job.correlation_id)),
                MessageEvent(
                    job=job, sequence=2, type="status",
                    data=status_event(Status.PROCESSING, job.correlation_id, attempt=1),
                ),
            ]
        )
    return job


def _same_request(existing: MessageJob, request_hash: str) -> MessageJob:
    if existing.request_hash != request_hash:
        raise Conflict(
            f"message_id {existing.message_id!r} is already used by a message with a different body."
        )
    return existing


# --- Running -------------------------------------------------------------------------------------


def claim_next() -> MessageJob | None:
    """Take the highest-priority pending message (oldest first among equals) for this worker."""
    for _ in range(10):
        with transaction.atomic():
            candidate = (
                MessageJob.objects.filter(status=Status.PENDING)
                .order_by("-priority", "created_at", "id")
                .select_for_update(skip_locked=True)
                .values_list("pk", "correlation_id")
                .first()
            )
            if candidate is None:
                return None
            pk, correlation_id = candidate
            now = timezone.now()
            won = _write(
                pk,
                Q(status=Status.PENDING),
                {"status": Status.PROCESSING, "attempts": 1, "started_at": now, "lease_expires_at": _lease()},
                [status_event(Status.PROCESSING, correlation_id, attempt=1)],
            )
        if won:
            return MessageJob.objects.get(pk=pk)
    return None  # lost every race; another token will come


def claim_rescued(job_pk: int, attempt: int) -> MessageJob | None:
    """Take over a message whose worker died while running attempt `attempt`."""
    job = MessageJob.objects.filter(pk=job_pk).only("correlation_id").first()
    if job is None:
        return None
    won = _write(
        job_pk,
        Q(status=Status.PROCESSING, attempts=attempt),
        {"attempts": attempt + 1, "lease_expires_at": _lease()},
        [status_event(Status.PROCESSING, job.correlation_id, attempt=attempt + 1)],
    )
    return MessageJob.objects.get(pk=job_pk) if won else None


def renew_lease(job_pk: int, attempt: int) -> bool:
    """Keep the lease of a message whose worker process is alive, though its model may be silent
    for longer than a lease (a slow first token, a long tool call). False if it is not ours."""
    return bool(
        MessageJob.objects.filter(pk=job_pk, status=Status.PROCESSING, attempts=attempt).update(lease_expires_at=_lease())
    )


def append_events(job_pk: int, attempt: int, events: list[dict[str, Any]]) -> None:
    """Record a running message's events and renew its lease; `Superseded` if it is not ours."""
    if not _write(job_pk, Q(status=Status.PROCESSING, attempts=attempt), {"lease_expires_at": _lease()}, events):
        raise Superseded


def complete(job: MessageJob, attempt: int, result: dict[str, Any] | None) -> bool:
    return _write(
        job.pk,
        Q(status=Status.PROCESSING, attempts=attempt),
        {"status": Status.COMPLETED, "result": result, "finished_at": timezone.now(), "lease_expires_at": None},
        [status_event(Status.COMPLETED, job.correlation_id)],
    )


def fail(job: MessageJob, attempt: int | None, status: str, error: dict[str, str], result: dict[str, Any] | None = None) -> bool:
    """End a message as `failed` (the provider could not complete it) or `error` (we could not)."""
    assert status in (Status.FAILED, Status.ERROR)
    match = Q(status=Status.PROCESSING) if attempt is None else Q(status=Status.PROCESSING, attempts=attempt)
    return _write(
        job.pk,
        match,
        {"status": status, "error": error, "result": result, "finished_at": timezone.now(), "lease_expires_at": None},
        [{"type": "error", "error": error}, status_event(status, job.correlation_id)],
    )


# --- Cancelling ---------------------------------------------------------------------------------


def cancel(job: MessageJob) -> MessageJob:
    """pending or processing → cancelled. Cancelling a cancelled message is fine; a message that
    completed, failed or errored first is a conflict, and the message says which it was."""
    from messaging.events import build_result

    with transaction.atomic():
        won = _write(
            job.pk,
            Q(status__in=ACTIVE_STATUSES),
            {"status": Status.CANCELLED, "finished_at": timezone.now(), "lease_expires_at": None},
            [status_event(Status.CANCELLED, job.correlation_id)],
        )
        if won:
            # Events are fenced by status, so none can land after ours: they are final.
            events = list(job.events.order_by("sequence").values_list("data", flat=True))
            MessageJob.objects.filter(pk=job.pk).update(result=build_result(events))
    job.refresh_from_db()
    if job.status != Status.CANCELLED:
        raise Conflict(f"Message {job.message_id} has already {_finished_phrase(job.status)}; it cannot be cancelled.")
    return job


def _finished_phrase(status: str) -> str:
    return {Status.COMPLETED: "completed", Status.FAILED: "failed", Status.ERROR: "ended in error"}.get(status, status)


def cancel_many(queryset: Any) -> int:
    """Cancel every pending or processing message in `queryset`; returns how many."""
    cancelled = 0
    while True:
        rows = list(
            queryset.filter(status__in=ACTIVE_STATUSES)
            .order_by()
            .values_list("pk", "status")[:CANCEL_CHUNK]
        )
        if not rows:
            return cancelled
        pending = [pk for pk, status in rows if status == Status.PENDING]
        cancelled += _cancel_pending(pending)
        for pk, status in rows:
            if status == Status.PROCESSING:
                job = MessageJob.objects.get(pk=pk)
                try:
                    cancel(job)
                    cancelled += 1
                except Conflict:
                    pass


def _cancel_pending(pks: list[int]) -> int:
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            MessageJob.objects.select_for_update()
            .filter(pk__in=pks, status=Status.PENDING)
            .values_list("pk", "last_sequence", "correlation_id")
        )
        if not rows:
            return 0
        MessageJob.objects.filter(pk__in=[row[0] for row in rows], status=Status.PENDING).update(
            status=Status.CANCELLED, finished_at=now, last_sequence=F("last_sequence") + 1
        )
        MessageEvent.objects.bulk_create(
            MessageEvent(job_id=pk, sequence=last + 1, type="status", data=status_event(Status.CANCELLED, correlation_id))
            for pk, last, correlation_id in rows
        )
        for pk, _, _ in rows:
            notify.publish(pk)
    return len(rows)


# --- Recovering ---------------------------------------------------------------------------------


def recover_stale() -> int:
    """Messages whose lease ran out lost their worker (killed, or its task lost by the Redis
    broker). Each is handed to a new token, once, or ends as `error` after too many attempts.
    Returns how many were handled."""
    from messaging import tasks

    now = timezone.now()
    stale = list(
        MessageJob.objects.filter(status=Status.PROCESSING, lease_expires_at__lt=now)
        .only("pk", "attempts", "correlation_id", "message_id")[:100]
    )
    for job in stale:
        if job.attempts >= settings.MESSAGING_MAX_ATTEMPTS:
            ended = fail(
                job,
                job.attempts,
                Status.ERROR,
                {
                    "type": "api_error",
                    "message": f"The worker running this message stopped {job.attempts} times; it was not tried again.",
                },
            )
            if ended:
                logger.error("message %s gave up after %s attempts", job.message_id, job.attempts)
            continue
        # Renewing the lease here is the claim on the rescue: one recoverer wins, and if its
        # token is lost as well, the lease runs out again and the message is rescued again.
        won = MessageJob.objects.filter(
            pk=job.pk, status=Status.PROCESSING, attempts=job.attempts, lease_expires_at__lt=now
        ).update(lease_expires_at=_lease())
        if won:
            logger.warning("message %s lost its worker during attempt %s; queued again", job.message_id, job.attempts)
            tasks.enqueue_token(rescue=(job.pk, job.attempts))
    return len(stale)


def requeue_lost() -> int:
    """Pending messages that no token will come for get new tokens. Returns how many.

    A token can be lost while its message waits: the Redis broker forgets the tokens a killed
    cluster had prefetched (the ORM broker hands them out again, but only after `retry`), a token
    whose claim met a database error is spent, and with Redis the web process may die between
    committing a message and queuing its token. So when the broker's queue is empty while
    messages have waited longer than a lease, the queue is topped up. A token too many costs one
    query: it finds nothing to claim.
    """
    from messaging import tasks

    if not tasks.queue_is_empty():
        return 0
    waited = timezone.now() - timedelta(seconds=settings.MESSAGING_LEASE_SECONDS)
    waiting = MessageJob.objects.filter(status=Status.PENDING, created_at__lt=waited)[:REQUEUE_BATCH].count()
    for _ in range(waiting):
        tasks.enqueue_token()
    if waiting:
        logger.warning("%s pending message(s) had no token in the queue; queued again", waiting)
    return waiting
