"""The status machine of a message, in one place.

    pending ──► processing ──► completed | failed | error
       ▲            │
       └────────────┤  (handed back by a stopping worker)
       └────────────┴──────► cancelled

Every transition is a conditional update (`filter(pk=…, status__in=…).update(…)`) written in
the same transaction as its `status` event, so a race has exactly one winner and the stream
never shows an event after a terminal status. A runner's writes are also fenced by `attempts`:
the value it claimed with. A runner that lost its message (cancelled, or taken over after its
lease ran out) has its next write refused and stops.

This module is below the runner (messaging/runner.py), which calls it in batches: one claim,
one lease renewal, one check and one event write serve every message a process runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from messaging import metrics, notify, queue, ratelimit, webhooks
from messaging.errors import Conflict
from messaging.events import build_result
from messaging.middleware import log_fields, request_id_var
from messaging.models import ACTIVE_STATUSES, MessageEvent, MessageJob, Status
from messaging.serializers import CheckedRequest, split_secrets

logger = logging.getLogger(__name__)

# Cancelling "select all" in the admin may meet millions of rows: one update per chunk.
CANCEL_CHUNK = 500
# (pk, attempt) pairs per lease-renewal UPDATE: SQLite parses a chain of ORs recursively.
LEASE_CHUNK = 250


class Superseded(Exception):
    """The message is no longer this runner's: cancelled, or taken over by another worker."""


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
        notify.publish([job_pk])  # a wake-up for streams, delivered when this commits
        if events:
            last = MessageJob.objects.filter(pk=job_pk).values_list("last_sequence", flat=True).get()
            MessageEvent.objects.bulk_create(_numbered(job_pk, last, events))
    return True


def _numbered(job_pk: int, last: int, events: list[dict[str, Any]]) -> list[MessageEvent]:
    """`events` as rows numbered up to `last`, the message's last_sequence after they were added."""
    first = last - len(events) + 1
    return [
        MessageEvent(job_id=job_pk, sequence=first + offset, type=event["type"], data=event)
        for offset, event in enumerate(events)
    ]


# --- Accepting ---------------------------------------------------------------------------------


def accept(
    owner: str, checked: CheckedRequest, message_id: str | None = None, *, max_unfinished: int | None = None
) -> tuple[MessageJob, bool]:
    """Store a valid request and queue it, in one transaction. Returns (job, created).

    A repeated `message_id` with the same body returns the existing message (created=False);
    with a different body it is a conflict. Neither counts against `max_unfinished` (the owner's
    pending and processing messages at most: past it, RateLimited and nothing stored).
    """
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
            if max_unfinished is not None:
                ratelimit.hold_unfinished(owner, max_unfinished, message_id)
            job = MessageJob.objects.create(**fields)
            MessageEvent.objects.create(
                job=job, sequence=1, type="status", data=status_event(Status.PENDING, job.correlation_id)
            )
            if queue.QUEUE_IN_DATABASE:
                queue.wake_a_worker()
    except IntegrityError:
        # Two requests raced with the same message_id; the first one stored wins.
        existing = MessageJob.objects.filter(owner=owner, message_id=message_id).first()
        if existing is None:
            raise
        return _same_request(existing, request_hash), False

    if not queue.QUEUE_IN_DATABASE:
        try:
            queue.wake_a_worker()
        except Exception:
            # The broker is down: take the message back, so that a 503 truly means "not accepted".
            job.delete()
            raise
    metrics.accepted(job.model, "async")
    logger.info("message %s accepted", job.message_id, extra=log_fields(job, event="accepted", owner=owner, model=job.model, priority=job.priority))
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
        # The submitting request's id ("" outside a request): the worker's logs carry it too.
        "request_id": "" if (request_id := request_id_var.get()) == "-" else request_id,
    }


def accept_and_claim(owner: str, checked: CheckedRequest, *, max_unfinished: int | None = None) -> MessageJob:
    """For the synchronous endpoint: store the message already claimed by the web process that
    runs it, with no token, so it never waits in the queue. Should that process die, the lease
    runs out and a worker takes the message up like any other."""
    fields = _new_message(owner, checked, checked.request_hash())
    now = timezone.now()
    fields.update(status=Status.PROCESSING, attempts=1, started_at=now, lease_expires_at=_lease(), last_sequence=2)
    with transaction.atomic():
        if max_unfinished is not None:
            ratelimit.hold_unfinished(owner, max_unfinished)
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
    metrics.accepted(job.model, "sync")
    logger.info("message %s accepted to run at once", job.message_id, extra=log_fields(job, event="accepted", owner=owner, model=job.model, priority=job.priority))
    return job


def _same_request(existing: MessageJob, request_hash: str) -> MessageJob:
    if existing.request_hash != request_hash:
        raise Conflict(
            f"message_id {existing.message_id!r} is already used by a message with a different body."
        )
    return existing


# --- Running -------------------------------------------------------------------------------------

_CLAIM_ORDER = ("-priority", "created_at", "id")
_CLAIM_FIELDS = ("pk", "priority", "created_at", "attempts", "handed_back", "correlation_id", "message_id")


def claim(limit: int) -> list[MessageJob]:
    """Take up to `limit` messages for this process, highest priority first, then oldest.

    Claimable are pending messages and running ones whose lease ran out (their worker died):
    a rescued message keeps its place by priority rather than waiting behind the backlog. A
    message that lost its worker MESSAGING_MAX_ATTEMPTS times ends as `error` instead (attempts
    handed back by a stopping worker are not failures).
    """
    now = timezone.now()
    lease = _lease()
    with transaction.atomic():
        stale = list(
            MessageJob.objects.filter(status=Status.PROCESSING, lease_expires_at__lt=now)
            .order_by(*_CLAIM_ORDER).select_for_update(skip_locked=True).values_list(*_CLAIM_FIELDS)[:limit]
        )
        pending = list(
            MessageJob.objects.filter(status=Status.PENDING)
            .order_by(*_CLAIM_ORDER).select_for_update(skip_locked=True).values_list(*_CLAIM_FIELDS)[:limit]
        )
        stale_pks = {row[0] for row in stale}
        chosen = sorted(stale + pending, key=lambda row: (-row[1], row[2], row[0]))[:limit]
        taken: list[int] = []
        for pk, _, _, attempts, handed_back, correlation_id, message_id in chosen:
            if pk in stale_pks and attempts - handed_back >= settings.MESSAGING_MAX_ATTEMPTS:
                _give_up(pk, attempts, correlation_id, message_id)
            else:
                taken.append(pk)
        if not taken:
            return []
        MessageJob.objects.filter(pk__in=taken).update(
            status=Status.PROCESSING,
            attempts=F("attempts") + 1,
            started_at=Coalesce("started_at", now),
            lease_expires_at=lease,
            last_sequence=F("last_sequence") + 1,
        )
        claimed = list(MessageJob.objects.filter(pk__in=taken))
        MessageEvent.objects.bulk_create(
            MessageEvent(
                job_id=job.pk, sequence=job.last_sequence, type="status",
                data=status_event(Status.PROCESSING, job.correlation_id, attempt=job.attempts),
            )
            for job in claimed
        )
        notify.publish(taken)
    metrics.claimed(claimed)
    for job in claimed:
        if job.pk in stale_pks:
            logger.warning("message %s lost its worker; attempt %s takes it up again", job.message_id, job.attempts, extra=log_fields(job))
    return sorted(claimed, key=lambda job: (-job.priority, job.created_at, job.pk))


def claim_next() -> MessageJob | None:
    claimed = claim(1)
    return claimed[0] if claimed else None


def _give_up(pk: int, attempts: int, correlation_id: str | None, message_id: str) -> None:
    error = {
        "type": "api_error",
        "message": f"The worker running this message stopped {attempts} times; it was not tried again.",
    }
    ended = _write(
        pk,
        Q(status=Status.PROCESSING, attempts=attempts),
        {"status": Status.ERROR, "error": error, "finished_at": timezone.now(), "lease_expires_at": None},
        [{"type": "error", "error": error}, status_event(Status.ERROR, correlation_id)],
    )
    if ended:
        # What its attempts streamed stays its result, as for any message that ends early.
        MessageJob.objects.filter(pk=pk).update(result=recorded_result(pk))
        _ended([pk])
        logger.error("message %s gave up after %s attempts", message_id, attempts)


def renew_leases(running: Iterable[tuple[int, int]]) -> None:
    """Keep the leases of every message a live process runs, given as (pk, attempt): a model
    silent for longer than a lease must not look like a dead worker. One UPDATE per chunk."""
    pairs = list(running)
    lease = _lease()
    for start in range(0, len(pairs), LEASE_CHUNK):
        match = reduce(or_, (Q(pk=pk, attempts=attempt) for pk, attempt in pairs[start : start + LEASE_CHUNK]))
        MessageJob.objects.filter(match, status=Status.PROCESSING).update(lease_expires_at=lease)


def still_ours(running: Iterable[tuple[int, int]]) -> set[int]:
    """Which of these (pk, attempt) messages are still running with that attempt: one query."""
    pairs = list(running)
    current = dict(
        MessageJob.objects.filter(pk__in=[pk for pk, _ in pairs], status=Status.PROCESSING).values_list("pk", "attempts")
    )
    return {pk for pk, attempt in pairs if current.get(pk) == attempt}


@dataclass
class End:
    """How a message ends: its terminal status and what it keeps."""

    status: str
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def events(self, correlation_id: str | None) -> list[dict[str, Any]]:
        errors = [{"type": "error", "error": self.error}] if self.error is not None else []
        return [*errors, status_event(self.status, correlation_id)]


@dataclass
class Write:
    """What a runner records of one running message in one flush: new events, and its end."""

    job_pk: int
    attempt: int
    events: list[dict[str, Any]]
    end: End | None = None
    correlation_id: str | None = None


def record(writes: list[Write]) -> set[int]:
    """Record every message's events and ends in ONE transaction (group commit: hundreds of
    messages streaming are one commit per flush interval, not one per message). Returns the
    pks no longer ours (cancelled, or taken over): nothing is written for those."""
    lost: set[int] = set()
    rows: list[MessageEvent] = []
    table = connection.ops.quote_name(MessageJob._meta.db_table)
    append = (
        f"UPDATE {table} SET last_sequence = last_sequence + %s "
        "WHERE id = %s AND status = %s AND attempts = %s RETURNING last_sequence"
    )
    with transaction.atomic():
        with connection.cursor() as cursor:
            for write in writes:
                events = write.events + (write.end.events(write.correlation_id) if write.end else [])
                if write.end is None:
                    cursor.execute(append, [len(events), write.job_pk, Status.PROCESSING, write.attempt])
                    found = cursor.fetchone()
                    last = found[0] if found else None
                else:
                    last = _end(write, len(events))
                if last is None:
                    lost.add(write.job_pk)
                    continue
                rows += _numbered(write.job_pk, last, events)
        MessageEvent.objects.bulk_create(rows)
        _ended([write.job_pk for write in writes if write.end is not None and write.job_pk not in lost])
        notify.publish([write.job_pk for write in writes if write.job_pk not in lost])
    return lost


def _end(write: Write, added: int) -> int | None:
    assert write.end is not None and write.end.status in (Status.COMPLETED, Status.FAILED, Status.ERROR)
    updated = MessageJob.objects.filter(pk=write.job_pk, status=Status.PROCESSING, attempts=write.attempt).update(
        status=write.end.status,
        result=write.end.result,
        error=write.end.error,
        finished_at=timezone.now(),
        lease_expires_at=None,
        last_sequence=F("last_sequence") + added,
    )
    if not updated:
        return None
    return MessageJob.objects.filter(pk=write.job_pk).values_list("last_sequence", flat=True).get()


def append_events(job_pk: int, attempt: int, events: list[dict[str, Any]]) -> None:
    """Record a running message's events; `Superseded` if it is not ours."""
    if record([Write(job_pk, attempt, events)]):
        raise Superseded


def complete(job: MessageJob, attempt: int, result: dict[str, Any] | None) -> bool:
    return not record([Write(job.pk, attempt, [], End(Status.COMPLETED, result=result), job.correlation_id)])


def fail(job: MessageJob, attempt: int, status: str, error: dict[str, str], result: dict[str, Any] | None = None) -> bool:
    """End a message as `failed` (the provider could not complete it) or `error` (we could not)."""
    return not record([Write(job.pk, attempt, [], End(status, result=result, error=error), job.correlation_id)])


def hand_back(running: Iterable[tuple[int, int]]) -> int:
    """A stopping worker's unfinished messages, as (pk, attempt), become pending again at once
    (not when their lease runs out), their attempt not counted as a failure. Returns how many."""
    pairs = list(running)
    correlation_ids = dict(MessageJob.objects.filter(pk__in=[pk for pk, _ in pairs]).values_list("pk", "correlation_id"))
    handed = 0
    for pk, attempt in pairs:
        if _write(
            pk,
            Q(status=Status.PROCESSING, attempts=attempt),
            {"status": Status.PENDING, "lease_expires_at": None, "handed_back": F("handed_back") + 1},
            [status_event(Status.PENDING, correlation_ids.get(pk), reason="worker_stopped")],
        ):
            handed += 1
    if handed:
        queue.wake_a_worker()  # another worker takes them now rather than at its next round
    return handed


# --- Cancelling ---------------------------------------------------------------------------------


def expire_pending(now: datetime | None = None) -> int:
    """pending → expired for messages still waiting MESSAGING_PENDING_TTL after they were
    accepted (a backlog never runs day-old work), in chunks. Returns how many."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.MESSAGING_PENDING_TTL)
    expired = 0
    while True:
        with transaction.atomic():
            rows = list(
                MessageJob.objects.select_for_update(skip_locked=True)
                .filter(status=Status.PENDING, created_at__lt=cutoff)
                .order_by().values_list("pk", "last_sequence", "correlation_id")[:CANCEL_CHUNK]
            )
            if not rows:
                return expired
            pks = [pk for pk, _, _ in rows]
            MessageJob.objects.filter(pk__in=pks, status=Status.PENDING).update(
                status=Status.EXPIRED, finished_at=timezone.now(), last_sequence=F("last_sequence") + 1
            )
            MessageEvent.objects.bulk_create(
                MessageEvent(job_id=pk, sequence=last + 1, type="status", data=status_event(Status.EXPIRED, correlation_id))
                for pk, last, correlation_id in rows
            )
            _ended(pks)
            notify.publish(pks)
        expired += len(rows)
        logger.warning("%s message(s) expired: still pending %s s after they were accepted", len(rows), settings.MESSAGING_PENDING_TTL)


def retry(job: MessageJob) -> MessageJob:
    """A failed or errored message's request as a NEW message (a terminal status never changes):
    same owner, request, secrets and correlation_id, a new message_id, and a first status event
    that names the message it retries. For staff (the admin's action)."""
    if job.status not in (Status.FAILED, Status.ERROR):
        raise Conflict(f"Message {job.message_id} has {_finished_phrase(job.status)}; only failed or errored messages are retried.")
    with transaction.atomic():
        retried = MessageJob.objects.create(
            owner=job.owner, model=job.model, priority=job.priority, correlation_id=job.correlation_id,
            request=job.request, secrets=job.secrets, request_hash=job.request_hash, warnings=job.warnings,
            request_id=job.request_id, last_sequence=1,
        )
        MessageEvent.objects.create(
            job=retried, sequence=1, type="status",
            data=status_event(Status.PENDING, retried.correlation_id, reason="retry", retry_of=job.message_id),
        )
        if queue.QUEUE_IN_DATABASE:
            queue.wake_a_worker()
    if not queue.QUEUE_IN_DATABASE:
        try:
            queue.wake_a_worker()
        except Exception:
            # Accepted all the same: a worker's next round claims it without a token.
            logger.exception("could not wake a worker for %s", retried.message_id)
    metrics.accepted(retried.model, "retry")
    logger.info(
        "message %s retries %s", retried.message_id, job.message_id,
        extra=log_fields(retried, event="accepted", owner=retried.owner, model=retried.model, priority=retried.priority, retry_of=job.message_id),
    )
    return retried


# What _ended's followers read of each ended message.
ENDED_FIELDS = ("message_id", "owner", "model", "correlation_id", "request_id", "status", "attempts", "error", "started_at", "finished_at")


def _ended(job_pks: list[int]) -> None:
    """What follows a terminal status, in the transaction that wrote it: the owners' webhooks, the metrics.
    Every path to a terminal status comes through here."""
    if not job_pks:
        return
    # One read of the ended messages serves all three.
    ended = list(MessageJob.objects.filter(pk__in=job_pks).only(*ENDED_FIELDS))
    webhooks.enqueue(ended)
    if logger.isEnabledFor(logging.INFO):
        transaction.on_commit(lambda: _log_finished(ended), robust=True)
    metrics.ended(ended)


def _log_finished(ended: list[MessageJob]) -> None:
    """Each message's last line, once its end is committed."""
    for job in ended:
        error_type = (job.error or {}).get("type")
        errors = {"error_type": error_type} if error_type else {}
        logger.info(
            "message %s %s%s", job.message_id, job.status, f" ({error_type})" if error_type else "",
            extra=log_fields(job, event="finished", message_status=job.status, attempt=job.attempts, **errors),
        )


def recorded_result(job_pk: int) -> dict[str, Any] | None:
    """The message its recorded events add up to (for a rescued attempt, its last one's)."""
    events = MessageEvent.objects.filter(job_id=job_pk).order_by("sequence").values_list("data", flat=True)
    return build_result(list(events))


def cancel(job: MessageJob) -> MessageJob:
    """pending or processing → cancelled. Cancelling a cancelled message is fine; a message that
    completed, failed or errored first is a conflict, and the message says which it was."""
    with transaction.atomic():
        won = _write(
            job.pk,
            Q(status__in=ACTIVE_STATUSES),
            {"status": Status.CANCELLED, "finished_at": timezone.now(), "lease_expires_at": None},
            [status_event(Status.CANCELLED, job.correlation_id)],
        )
        if won:
            # Events are fenced by status, so none can land after ours: they are final.
            MessageJob.objects.filter(pk=job.pk).update(result=recorded_result(job.pk))
            _ended([job.pk])
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
        _ended([pk for pk, _, _ in rows])
        notify.publish([pk for pk, _, _ in rows])
    return len(rows)
