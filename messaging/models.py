from __future__ import annotations

import base64
import os
import time

from django.db import models
from django.db.models import Q
from rest_framework_api_key.models import AbstractAPIKey

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_message_id() -> str:
    """A ULID with the `msg_` prefix: sortable by creation time, like the contract's examples."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, index = divmod(value, 32)
        chars.append(_CROCKFORD[index])
    return "msg_" + "".join(reversed(chars))


class Status(models.TextChoices):
    # Labels as the contract spells them, in the admin too.
    PENDING = "pending", "pending"
    PROCESSING = "processing", "processing"
    COMPLETED = "completed", "completed"
    FAILED = "failed", "failed"
    ERROR = "error", "error"
    CANCELLED = "cancelled", "cancelled"
    # Still pending after MESSAGING_PENDING_TTL: never run.
    EXPIRED = "expired", "expired"


ACTIVE_STATUSES = (Status.PENDING, Status.PROCESSING)
TERMINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.ERROR, Status.CANCELLED, Status.EXPIRED)


class APIKey(AbstractAPIKey):
    """A hashed API key. Messages belong to the key's owner, so an owner's keys share them."""

    owner = models.CharField(max_length=150, db_index=True)
    # Per-key limits; null: the defaults (MESSAGING_RATE_LIMIT_RPM, MESSAGING_MAX_UNFINISHED).
    rate_limit_rpm = models.PositiveIntegerField(
        null=True, blank=True, verbose_name="requests per minute",
        help_text="Empty: MESSAGING_RATE_LIMIT_RPM (unset there: no limit).",
    )
    max_unfinished = models.PositiveIntegerField(
        null=True, blank=True, verbose_name="unfinished messages at most",
        help_text="Pending and processing messages of this key's owner. Empty: MESSAGING_MAX_UNFINISHED (unset there: no limit).",
    )

    class Meta(AbstractAPIKey.Meta):
        verbose_name = "API key"
        verbose_name_plural = "API keys"


class MessageJob(models.Model):
    message_id = models.CharField(max_length=128, default=new_message_id)
    owner = models.CharField(max_length=150)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    model = models.CharField(max_length=128)
    priority = models.PositiveSmallIntegerField(default=5)
    correlation_id = models.CharField(max_length=255, null=True, blank=True)
    # The X-Request-ID of the request that submitted it: worker logs carry it too.
    request_id = models.CharField(max_length=64, blank=True, default="")

    # The validated request with secrets replaced by "[redacted]": safe to show to staff.
    request = models.JSONField()
    # MCP tokens and tool_context, kept apart so nothing that displays `request` can leak them.
    secrets = models.JSONField(default=dict, blank=True)
    # sha256 of the request body as sent (canonical JSON): an idempotent retry must match it.
    request_hash = models.CharField(max_length=64)
    warnings = models.JSONField(default=list, blank=True)

    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)

    # Incremented on every claim. It is also the fencing token: a worker writes only while
    # `attempts` still equals the value it claimed with.
    attempts = models.PositiveSmallIntegerField(default=0)
    # Attempts a stopping worker handed back unfinished: not failures, so not counted against
    # MESSAGING_MAX_ATTEMPTS.
    handed_back = models.PositiveSmallIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    last_sequence = models.PositiveIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "message"
        constraints = [
            models.UniqueConstraint(fields=["owner", "message_id"], name="message_id_unique_per_owner"),
        ]
        indexes = [
            # GET /v1/messages: an owner's messages, newest first, keyset-paged.
            models.Index(fields=["owner", "-created_at", "-id"], name="job_owner_created"),
            # Workers: the next pending message by priority, then age.
            models.Index(
                fields=["-priority", "created_at", "id"],
                condition=Q(status="pending"),
                name="job_pending_queue",
            ),
            # Recovery: running messages whose lease ran out.
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status="processing"),
                name="job_processing_lease",
            ),
            # The unfinished cap (messaging/ratelimit.py): an owner's pending and processing
            # messages, counted up to the cap, whatever the size of its history.
            models.Index(fields=["owner"], condition=Q(status__in=["pending", "processing"]), name="job_owner_unfinished"),
            # Admin list (newest first, optionally by status) and its exact-match searches.
            models.Index(fields=["-created_at", "-id"], name="job_created"),
            models.Index(fields=["status", "-created_at"], name="job_status_created"),
            # Admin's model filter (and GET /v1/messages?model=): a rare model is no full scan.
            models.Index(fields=["model", "-created_at"], name="job_model_created"),
            models.Index(fields=["message_id"], name="job_message_id"),
            models.Index(fields=["correlation_id"], name="job_correlation_id"),
        ]

    def __str__(self) -> str:
        return self.message_id

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class RateLimitWindow(models.Model):
    """An API key's current one-minute window of requests: the rate limiter's store when there
    is no Redis (messaging/ratelimit.py updates it in one atomic statement)."""

    key_prefix = models.CharField(max_length=64, primary_key=True)
    started_ms = models.BigIntegerField()  # milliseconds since the epoch
    requests = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"{self.key_prefix}: {self.requests} since {self.started_ms}"


class MessageEvent(models.Model):
    """One event of a message's stream, numbered 1, 2, 3… per message."""

    job = models.ForeignKey(MessageJob, on_delete=models.CASCADE, related_name="events")
    sequence = models.PositiveIntegerField()
    type = models.CharField(max_length=64)
    data = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "sequence"], name="event_sequence_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.sequence} {self.type}"


class WorkerHeartbeat(models.Model):
    """Each worker process writes its name here every few seconds; /readyz reads it."""

    name = models.CharField(max_length=200, primary_key=True)
    seen_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name


def new_webhook_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` and 24 random bytes, base64."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


class WebhookEndpoint(models.Model):
    """Where an owner's messages announce that they finished (messaging/webhooks.py)."""

    owner = models.CharField(max_length=150, db_index=True, help_text="Whose messages it is told about.")
    # Checked by messaging.webhooks.url_problem (http(s), and the outbound policy), not URLField's rules.
    url = models.CharField(max_length=2048, help_text="http(s); the outbound policy applies, as for MCP servers.")
    description = models.CharField(max_length=200, blank=True)
    # Shown once, when the endpoint is created; never again (not in the admin, not in logs).
    secret = models.CharField(max_length=100, default=new_webhook_secret, editable=False)
    is_active = models.BooleanField(default=True, help_text="Inactive: no new events (those already queued are still delivered).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "webhook endpoint"

    def __str__(self) -> str:
        return f"{self.owner}: {self.url}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "pending"
    DELIVERED = "delivered", "delivered"
    FAILED = "failed", "failed (gave up)"


class WebhookDelivery(models.Model):
    """The outbox: one event for one endpoint, written in the transaction that ended the
    message, delivered by the workers until a 2xx or its give-up time."""

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    job = models.ForeignKey(MessageJob, on_delete=models.CASCADE, related_name="webhook_deliveries")
    event_type = models.CharField(max_length=64)
    # The `webhook-id` header: the same for every attempt, so a receiver can drop repeats.
    webhook_id = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When a worker may next try it: due now, after a backoff, or after a claim's lease.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    give_up_at = models.DateTimeField()
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "webhook delivery"
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="delivery_due"),
            models.Index(fields=["-created_at", "-id"], name="delivery_created"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.webhook_id}"


class WebhookAttempt(models.Model):
    """One POST of a delivery: what the receiver answered, and when."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log")
    attempted_at = models.DateTimeField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)
    duration_ms = models.PositiveIntegerField()

    class Meta:
        ordering = ["attempted_at", "id"]
