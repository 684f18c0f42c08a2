"""Webhooks: a message that reaches a terminal status tells its owner's endpoints.

Each event is signed as the Standard Webhooks specification says (`webhook-id`,
`webhook-timestamp`, `webhook-signature` headers, with the `standardwebhooks` library), so a
receiver verifies it with any Standard Webhooks library, or the recipe in OpenAI's and others'
docs, unchanged.

Durable, at least once: the event is an outbox row (`WebhookDelivery`) written in the same
transaction as the terminal status (`enqueue`, called by messaging/jobs.py), so a message never
ends without its events being queued, and queuing never waits on a receiver. Worker runners
deliver them (`claim_due`, `send`, `record_attempt`): a claim holds a delivery for one attempt's
time, so a worker that dies mid-delivery leaves it to another; a failed attempt is tried again
after MESSAGING_WEBHOOK_RETRY_BASE seconds, doubling up to an hour, until
MESSAGING_WEBHOOK_GIVE_UP (24 h) after the event. Every attempt is kept (`WebhookAttempt`) for
the admin. The outbound policy of MCP servers applies: at registration, and on the addresses
the URL resolves to at every attempt.

The event's `data` is the message's state as GET /v1/messages shows it, without the result
(which can be megabytes: read it with GET /v1/messages/{message_id}) and without secrets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from urllib.parse import urlsplit

import orjson
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook

from messaging import outbound
from messaging.models import DeliveryStatus, MessageJob, Status, WebhookAttempt, WebhookDelivery, WebhookEndpoint, new_message_id
from messaging.serializers import message_state

logger = logging.getLogger(__name__)

EVENT_TYPES = {
    Status.COMPLETED: "message.completed",
    Status.FAILED: "message.failed",
    Status.CANCELLED: "message.cancelled",
    Status.ERROR: "message.error",
    Status.EXPIRED: "message.expired",
}
# The longest wait between two attempts.
MAX_RETRY_DELAY = 3600.0
# A receiver's answer is not read beyond its status line and this much.
MAX_RESPONSE_BYTES = 64 * 1024


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook endpoint, or None (at registration)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "must be an http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL"
    if not outbound.host_allowed(parts.hostname):
        return f"{parts.hostname} is not allowed by this server's outbound policy"
    return None


def enqueue(jobs: list[MessageJob]) -> int:
    """Queue one event per active endpoint of each message's owner. Called inside the
    transaction that gave these messages their terminal status (with their owner and status
    read); returns how many."""
    if not jobs:
        return 0
    # One query in the common case of owners without endpoints.
    endpoints: dict[str, list[int]] = defaultdict(list)
    for pk, owner in WebhookEndpoint.objects.filter(is_active=True, owner__in={job.owner for job in jobs}).values_list("pk", "owner"):
        endpoints[owner].append(pk)
    if not endpoints:
        return 0
    now = timezone.now()
    give_up_at = now + timedelta(seconds=settings.MESSAGING_WEBHOOK_GIVE_UP)
    deliveries = [
        WebhookDelivery(
            endpoint_id=endpoint, job_id=job.pk, event_type=EVENT_TYPES[job.status], webhook_id=new_message_id().replace("msg_", "evt_"),
            next_attempt_at=now, give_up_at=give_up_at,
        )
        for job in jobs
        for endpoint in endpoints[job.owner]
    ]
    WebhookDelivery.objects.bulk_create(deliveries)
    return len(deliveries)


@dataclass(frozen=True)
class Due:
    """A delivery claimed for one attempt: everything needed to send it."""

    pk: int
    webhook_id: str
    url: str
    secret: str
    body: bytes


def claim_due(limit: int) -> list[Due]:
    """Take up to `limit` deliveries that are due, holding each for one attempt's time."""
    now = timezone.now()
    held_until = now + timedelta(seconds=settings.MESSAGING_WEBHOOK_TIMEOUT + 5)
    with transaction.atomic():
        pks = list(
            WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at")
            .select_for_update(skip_locked=True)
            .values_list("pk", flat=True)[:limit]
        )
        if not pks:
            return []
        WebhookDelivery.objects.filter(pk__in=pks).update(next_attempt_at=held_until)
        deliveries = list(WebhookDelivery.objects.filter(pk__in=pks).select_related("endpoint", "job"))
    return [Due(d.pk, d.webhook_id, d.endpoint.url, d.endpoint.secret, event_body(d.event_type, d.job)) for d in deliveries]


def event_body(event_type: str, job: MessageJob) -> bytes:
    event = {"type": event_type, "timestamp": job.finished_at, "data": message_state(job, with_result=False)}
    return orjson.dumps(event, option=orjson.OPT_UTC_Z)


@dataclass(frozen=True)
class Outcome:
    attempted_at: datetime
    status_code: int | None
    error: str
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def send(due: Due) -> Outcome:
    """POST one event, signed; never raises (a failure is an outcome)."""
    attempted_at = timezone.now()
    body = due.body.decode()
    signed_at = datetime.now(dt_timezone.utc)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "messaging-webhooks",
        "webhook-id": due.webhook_id,
        "webhook-timestamp": str(int(signed_at.timestamp())),
        "webhook-signature": Webhook(due.secret).sign(due.webhook_id, signed_at, body),
    }
    timeout = settings.MESSAGING_WEBHOOK_TIMEOUT
    started = time.monotonic()
    status_code, error = None, ""
    try:
        async with asyncio.timeout(timeout):
            async with outbound.http_client(headers=None, timeout=timeout, read_timeout=timeout, max_response_bytes=MAX_RESPONSE_BYTES) as client:
                async with client.stream("POST", due.url, content=due.body, headers=headers) as response:
                    status_code = response.status_code
    except TimeoutError:
        error = f"no answer within {timeout:g} seconds"
    except Exception as exc:  # refused by the policy, unreachable, reset: all tried again later
        error = f"{type(exc).__name__}: {exc}"[:300]
    return Outcome(attempted_at, status_code, error, int((time.monotonic() - started) * 1000))


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt, after `attempts` failed ones."""
    return min(settings.MESSAGING_WEBHOOK_RETRY_BASE * 2 ** (attempts - 1), MAX_RETRY_DELAY)


def record_attempt(pk: int, outcome: Outcome) -> str:
    """Keep an attempt, and decide what comes next: delivered, another try, or given up.
    Returns the delivery's status."""
    now = timezone.now()
    with transaction.atomic():
        delivery = WebhookDelivery.objects.select_for_update().get(pk=pk)
        WebhookAttempt.objects.create(
            delivery=delivery, attempted_at=outcome.attempted_at, status_code=outcome.status_code,
            error=outcome.error, duration_ms=outcome.duration_ms,
        )
        delivery.attempts += 1
        delivery.last_status_code = outcome.status_code
        delivery.last_error = outcome.error
        delivery.last_attempt_at = outcome.attempted_at
        if outcome.delivered:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = DeliveryStatus.DELIVERED, now, None
        else:
            next_attempt_at = now + timedelta(seconds=retry_delay(delivery.attempts))
            if next_attempt_at > delivery.give_up_at:
                delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
                logger.warning("webhook %s to endpoint %s given up after %s attempts", delivery.webhook_id, delivery.endpoint_id, delivery.attempts)
            else:
                delivery.next_attempt_at = next_attempt_at
        delivery.save()
    return str(delivery.status)


def redeliver(deliveries: Iterable[int]) -> int:
    """Send these again now (the admin's action), with a fresh give-up time; same webhook-id,
    so a receiver that already has it can tell."""
    now = timezone.now()
    return WebhookDelivery.objects.filter(pk__in=list(deliveries)).update(
        status=DeliveryStatus.PENDING, next_attempt_at=now, give_up_at=now + timedelta(seconds=settings.MESSAGING_WEBHOOK_GIVE_UP),
    )
