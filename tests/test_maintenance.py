"""Expiry and retention, the schedule that runs them, the purge command, and the admin's
figures and retry action. Time is injected (rows dated in the past, or `now` given), never slept
through; the last test runs the real schedule in a real `qcluster`."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.models import Schedule
from rest_framework.test import APIClient

from messaging import jobs, maintenance, runner
from messaging.models import APIKey, MessageEvent, MessageJob, Status, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from messaging.serializers import check_request
from tests.processes import wait_until
from tests.test_worker import LONG_TEXT, Api

DAY = timedelta(days=1)


def accept(text: str = "hello", **fields: Any) -> MessageJob:
    checked = check_request({"messages": [{"role": "user", "content": text}], **fields}, endpoint="async")
    assert checked.valid, checked.errors
    return jobs.accept("alice", checked)[0]


def finished(ago: timedelta, *, text: str = "four words right here", stream: bool = True) -> MessageJob:
    """A message run to its end, then dated `ago` in the past."""
    job = accept(text, stream=stream)
    runner.run_one()
    when = timezone.now() - ago
    MessageJob.objects.filter(pk=job.pk).update(created_at=when, started_at=when, finished_at=when)
    job.refresh_from_db()
    return job


def statuses(job: MessageJob) -> list[str]:
    return [data["status"] for data in job.events.order_by("sequence").values_list("data", flat=True) if data["type"] == "status"]


@pytest.mark.django_db
def test_migrate_installs_the_schedule() -> None:
    schedule = Schedule.objects.get(name=maintenance.SCHEDULE_NAME)

    assert (schedule.func, schedule.schedule_type, schedule.minutes, schedule.repeats) == ("messaging.maintenance.run", Schedule.MINUTES, 1, -1)


@pytest.mark.django_db(transaction=True)
def test_a_message_pending_past_its_ttl_expires_and_its_owner_is_told(settings: Any) -> None:
    WebhookEndpoint.objects.create(owner="alice", url="https://hooks.example.com/x")
    stale, fresh = accept("old"), accept("new")
    MessageJob.objects.filter(pk=stale.pk).update(created_at=timezone.now() - DAY - timedelta(seconds=1))

    assert maintenance.run() == "expired 1, purged 0 messages and 0 events"

    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert (stale.status, fresh.status) == (Status.EXPIRED, Status.PENDING)
    assert stale.finished_at is not None and stale.attempts == 0
    assert statuses(stale) == ["pending", "expired"]
    assert WebhookDelivery.objects.get().event_type == "message.expired"
    # Never run: the next claim takes the fresh one.
    assert jobs.claim_next().pk == fresh.pk  # type: ignore[union-attr]


@pytest.mark.django_db(transaction=True)
def test_the_ttl_counts_from_acceptance(settings: Any) -> None:
    settings.MESSAGING_PENDING_TTL = 60
    job = accept()

    assert jobs.expire_pending(timezone.now() + timedelta(seconds=59)) == 0
    assert jobs.expire_pending(timezone.now() + timedelta(seconds=61)) == 1
    job.refresh_from_db()
    assert job.status == Status.EXPIRED


@pytest.mark.django_db(transaction=True)
def test_retention_deletes_old_finished_messages_with_everything_theirs_in_chunks(monkeypatch: pytest.MonkeyPatch, alice: APIClient) -> None:
    monkeypatch.setattr(maintenance, "MESSAGES_PER_CHUNK", 2)
    monkeypatch.setattr(maintenance, "EVENTS_PER_DELETE", 3)
    endpoint = WebhookEndpoint.objects.create(owner="alice", url="https://hooks.example.com/x")
    old = [finished(31 * DAY) for _ in range(5)]
    kept = finished(29 * DAY)
    delivery = WebhookDelivery.objects.filter(job=old[0]).get()
    WebhookAttempt.objects.create(delivery=delivery, attempted_at=timezone.now(), status_code=200, duration_ms=3)
    running = accept()
    MessageJob.objects.filter(pk=running.pk).update(created_at=timezone.now() - 40 * DAY)  # not finished: never purged
    events_before = MessageEvent.objects.filter(job__in=old).count()
    assert events_before > 5 * 3

    purged = maintenance.purge()

    assert (purged.messages, purged.events) == (5, events_before)
    assert not MessageJob.objects.filter(pk__in=[job.pk for job in old]).exists()
    assert not MessageEvent.objects.filter(job_id__in=[job.pk for job in old]).exists()
    assert not WebhookDelivery.objects.filter(job_id__in=[job.pk for job in old]).exists() and not WebhookAttempt.objects.exists()
    assert MessageEvent.objects.filter(job=kept).exists() and WebhookDelivery.objects.filter(job=kept).exists()
    assert endpoint in WebhookEndpoint.objects.all()
    assert alice.get(f"/v1/messages/{old[0].message_id}").status_code == 404
    assert alice.get(f"/v1/messages/{kept.message_id}").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_purge_messages_counts_with_dry_run_and_deletes_without() -> None:
    old = finished(31 * DAY)
    events = old.events.count()

    out = io.StringIO()
    call_command("purge_messages", "--dry-run", stdout=out)
    assert out.getvalue().startswith("Would delete 1 messages finished before ")
    assert out.getvalue().rstrip().endswith(f"(30 days), with {events} events.")
    assert MessageJob.objects.filter(pk=old.pk).exists()

    out = io.StringIO()
    call_command("purge_messages", stdout=out)
    assert out.getvalue().startswith("Deleted 1 messages finished before ")
    assert not MessageJob.objects.exists() and not MessageEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_admin_shows_live_figures_and_retries_a_failed_message_as_a_new_one(admin_client: Any) -> None:
    accept("waiting")
    MessageJob.objects.filter(status=Status.PENDING).update(created_at=timezone.now() - timedelta(minutes=5))
    failed = accept("will fail", correlation_id="order-9")
    claimed = jobs.claim(10)
    assert len(claimed) == 2
    jobs.fail(next(job for job in claimed if job.pk == failed.pk), 1, Status.FAILED, {"type": "api_error", "message": "upstream down"})
    accept("another waiting")

    page = admin_client.get("/admin/messaging/messagejob/").content.decode()
    assert '<span class="figure">1</span><span class="label">pending</span>' in page
    assert '<span class="figure">1</span><span class="label">processing</span>' in page
    assert '<span class="figure">1</span><span class="label">failed in the last hour</span>' in page
    assert '<span class="label">oldest pending</span>' in page

    response = admin_client.post("/admin/messaging/messagejob/", {"action": "retry_selected", "_selected_action": [failed.pk]}, follow=True)

    retry = MessageJob.objects.exclude(pk__in=[job.pk for job in claimed]).filter(correlation_id="order-9").get()
    assert f"{failed.message_id} → {retry.message_id}" in response.content.decode()
    failed.refresh_from_db()
    assert failed.status == Status.FAILED  # a finished message never changes
    assert (retry.status, retry.request, retry.secrets, retry.owner) == (Status.PENDING, failed.request, failed.secrets, failed.owner)
    first = retry.events.get(sequence=1).data
    assert (first["status"], first["reason"], first["retry_of"]) == ("pending", "retry", failed.message_id)


# --- the real schedule in a real cluster --------------------------------------------------------------


@pytest.fixture
def api(live_server: Any, broker: None) -> Api:
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    return Api(live_server.url, key)


@pytest.mark.e2e
def test_the_schedule_expires_and_purges_in_a_running_cluster(api: Api, start_cluster: Any) -> None:
    from django_q.brokers import get_broker
    from django_q.scheduler import scheduler

    old = finished(31 * DAY)
    # One worker with one slot, kept busy: the next message waits in the queue.
    start_cluster(MESSAGING_WORKERS=1, MESSAGING_CONCURRENCY=1)
    busy = api.submit(LONG_TEXT, model="echo-slow")
    api.wait_for_status(busy, "processing")
    waiting = api.submit("a day too late")
    MessageJob.objects.filter(message_id=waiting).update(created_at=timezone.now() - DAY - timedelta(minutes=1))

    # The schedule is due; this is what the cluster's guard does every 30 s.
    Schedule.objects.filter(name=maintenance.SCHEDULE_NAME).update(next_run=timezone.now())
    scheduler(broker=get_broker())

    assert api.wait_for_status(waiting, "expired")["status"] == "expired"
    wait_until(lambda: not MessageJob.objects.filter(pk=old.pk).exists(), what="the old message to be purged")
    assert api.call("GET", f"/v1/messages/{old.message_id}")[0] == 404
    api.call("POST", f"/v1/messages/{busy}/cancel")
