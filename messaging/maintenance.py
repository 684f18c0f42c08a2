"""Housekeeping that runs on its own: expiry and retention.

The service installs a django-q2 schedule (`install_schedule`, on every `migrate`) that runs
`run` every minute in a worker: messages still pending after MESSAGING_PENDING_TTL end as
`expired` (`jobs.expire_pending`), and finished messages older than MESSAGING_RETENTION_DAYS
are deleted with their events and webhook deliveries (`purge`). `manage.py purge_messages`
runs the purge by hand, or only counts (`--dry-run`).

Deleting runs in short transactions: a chunk of messages is chosen, their events go a few
thousand rows at a time, then their deliveries and the messages themselves; no transaction
holds the database for long, and a purge cut short leaves finished messages that are merely
missing some events, never events without their message. Each run stops after a time budget;
the next minute carries on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from messaging import jobs
from messaging.models import TERMINAL_STATUSES, MessageEvent, MessageJob, WebhookDelivery

logger = logging.getLogger(__name__)

SCHEDULE_NAME = "messaging maintenance"
TASK = "messaging.maintenance.run"
# Messages chosen per chunk, and events deleted per transaction.
MESSAGES_PER_CHUNK = 200
EVENTS_PER_DELETE = 5000
# A run stops starting new chunks after this long (well inside django-q2's task timeout).
TIME_BUDGET = 20.0


def install_schedule(**kwargs: object) -> None:
    """Every minute, `run` (a post_migrate receiver: `migrate` installs it, and keeps it so)."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={"func": TASK, "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )


def run(now: datetime | None = None) -> str:
    """The scheduled task: expire, then purge. `now` is for tests that move time."""
    expired = jobs.expire_pending(now)
    purged = purge(now)
    return f"expired {expired}, purged {purged.messages} messages and {purged.events} events"


@dataclass
class Purged:
    messages: int = 0
    events: int = 0


def retention_cutoff(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(days=settings.MESSAGING_RETENTION_DAYS)


def purgeable(now: datetime | None = None) -> object:
    """Finished messages past retention. Served by the created_at index: a message that
    finished before the cutoff was created before it, and the purge keeps that set small."""
    cutoff = retention_cutoff(now)
    return MessageJob.objects.filter(created_at__lt=cutoff, finished_at__lt=cutoff, status__in=TERMINAL_STATUSES)


def purge(now: datetime | None = None, *, budget: float = TIME_BUDGET) -> Purged:
    purged = Purged()
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        pks = list(purgeable(now).order_by().values_list("pk", flat=True)[:MESSAGES_PER_CHUNK])  # type: ignore[attr-defined]
        if not pks:
            break
        while True:
            with transaction.atomic():
                events = list(MessageEvent.objects.filter(job_id__in=pks).values_list("pk", flat=True)[:EVENTS_PER_DELETE])
                if not events:
                    break
                MessageEvent.objects.filter(pk__in=events).delete()
            purged.events += len(events)
        with transaction.atomic():
            WebhookDelivery.objects.filter(job_id__in=pks).delete()  # with their attempts
            # Still finished and old (a message never leaves a terminal status): gone for good.
            MessageJob.objects.filter(pk__in=pks, status__in=TERMINAL_STATUSES).delete()
        purged.messages += len(pks)
    if purged.messages:
        logger.info("retention: purged %s messages and %s events finished over %s days ago", purged.messages, purged.events, settings.MESSAGING_RETENTION_DAYS)
    return purged
