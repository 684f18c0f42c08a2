"""Webhooks: signed events for finished messages, from an outbox, at least once.

The receiver is a real HTTP server (tests/webhook_receiver.py) that verifies every event with
the `standardwebhooks` library. The first part runs the pieces in this process (the outbox
written with the terminal status, the event, retries, the admin, the command); the second
runs them through a real `qcluster`, including a worker killed in the middle of a delivery.
"""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from messaging import jobs, outbound, runner, webhooks
from messaging.models import APIKey, DeliveryStatus, MessageJob, WebhookDelivery, WebhookEndpoint
from messaging.serializers import check_request
from tests import aio
from tests.processes import wait_until
from tests.test_worker import LONG_TEXT, Api
from tests.webhook_receiver import HOLD, Receiver, receiver  # noqa: F401 (a fixture)

CANARY = "webhook-tool-context-canary-55e1"


@pytest.fixture(autouse=True)
def open_policy(settings: Any) -> None:
    # The receiver is on loopback, which production refuses.
    settings.MESSAGING_MCP_ALLOW_PRIVATE = True
    settings.MESSAGING_WEBHOOK_RETRY_BASE = 0.01


def endpoint(receiver: Receiver, owner: str = "alice") -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(owner=owner, url=receiver.url)


def accept(text: str = "hello", owner: str = "alice", **fields: Any) -> MessageJob:
    checked = check_request({"messages": [{"role": "user", "content": text}], **fields}, endpoint="async")
    assert checked.valid, checked.errors
    return jobs.accept(owner, checked)[0]


def deliver_due() -> list[str]:
    """One delivery round, as a worker's runner does it: claim, send, record."""
    due = webhooks.claim_due(64)
    return [webhooks.record_attempt(one.pk, aio.run(webhooks.send(one))) for one in due]


# --- in this process --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_finished_message_queues_one_signed_event_per_endpoint_of_its_owner(receiver: Receiver) -> None:
    hook = endpoint(receiver)
    WebhookEndpoint.objects.create(owner="alice", url=receiver.url + "/inactive", is_active=False)
    WebhookEndpoint.objects.create(owner="bob", url=receiver.url + "/bob")
    job = accept(correlation_id="order-7", tool_context=[{"note": CANARY}])
    assert not WebhookDelivery.objects.exists()  # nothing until it finishes

    runner.run_one()

    delivery = WebhookDelivery.objects.get()
    assert (delivery.endpoint, delivery.job_id, delivery.event_type, delivery.status) == (hook, job.pk, "message.completed", DeliveryStatus.PENDING)
    assert deliver_due() == ["delivered"]
    [event] = receiver.verified(hook.secret)
    job.refresh_from_db()
    assert event == {
        "type": "message.completed",
        "timestamp": job.finished_at.isoformat().replace("+00:00", "Z"),
        "data": {
            "message_id": job.message_id, "status": "completed", "model": "echo", "priority": 5, "correlation_id": "order-7",
            "created_at": job.created_at.isoformat().replace("+00:00", "Z"), "started_at": job.started_at.isoformat().replace("+00:00", "Z"),
            "finished_at": job.finished_at.isoformat().replace("+00:00", "Z"), "attempts": 1, "error": None,
        },
    }
    headers = receiver.requests[0].headers
    assert headers["webhook-id"] == delivery.webhook_id and headers["webhook-signature"].startswith("v1,")
    assert CANARY not in receiver.requests[0].body.decode()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (DeliveryStatus.DELIVERED, 1, 200)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", ["cancelled", "failed", "error"])
def test_every_terminal_status_has_its_event(receiver: Receiver, ending: str) -> None:
    hook = endpoint(receiver)
    job = accept()
    if ending == "cancelled":
        jobs.cancel(job)
    else:
        claimed = jobs.claim_next()
        assert claimed is not None
        jobs.fail(claimed, claimed.attempts, ending, {"type": "api_error", "message": "it broke"})

    assert deliver_due() == ["delivered"]
    [event] = receiver.verified(hook.secret)
    assert event["type"] == f"message.{ending}"
    assert event["data"]["status"] == ending


@pytest.mark.django_db(transaction=True)
def test_a_failing_receiver_is_tried_again_until_it_answers_and_every_attempt_is_kept(receiver: Receiver, admin_client: Any) -> None:
    hook = endpoint(receiver)
    receiver.script(500, 500, 500)
    jobs.cancel(accept())
    delivery = WebhookDelivery.objects.get()

    statuses = []
    while not statuses or statuses[-1] == "pending":
        wait_until(lambda: WebhookDelivery.objects.get().next_attempt_at <= timezone.now(), what="the next attempt to be due")
        statuses += deliver_due()

    assert statuses == ["pending", "pending", "pending", "delivered"]
    assert [received.answered for received in receiver.requests] == [500, 500, 500, 200]
    assert len({received.headers["webhook-id"] for received in receiver.requests}) == 1
    assert len(receiver.verified(hook.secret)) == 4
    page = admin_client.get(f"/admin/messaging/webhookdelivery/{delivery.pk}/change/").content.decode()
    assert re.findall(r'<td class="field-status_code">\s*<p>(\d+)</p>', page) == ["500", "500", "500", "200"]
    assert hook.secret not in page


@pytest.mark.django_db(transaction=True)
def test_a_delivery_past_its_give_up_time_is_failed_and_can_be_redelivered(receiver: Receiver, admin_client: Any) -> None:
    endpoint(receiver)
    receiver.script(503)
    jobs.cancel(accept())
    WebhookDelivery.objects.update(give_up_at=timezone.now() + timedelta(milliseconds=1))

    assert deliver_due() == ["failed"]
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.next_attempt_at, delivery.last_status_code) == (DeliveryStatus.FAILED, None, 503)

    response = admin_client.post("/admin/messaging/webhookdelivery/", {"action": "redeliver_selected", "_selected_action": [delivery.pk]}, follow=True)

    assert "1 delivery will be sent again now" in response.content.decode()
    assert deliver_due() == ["delivered"]
    assert [received.headers["webhook-id"] for received in receiver.requests] == [delivery.webhook_id] * 2


@pytest.mark.django_db(transaction=True)
def test_a_name_that_resolves_to_loopback_is_refused_at_delivery(receiver: Receiver, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    WebhookEndpoint.objects.create(owner="alice", url=f"http://hooks.example.com:{port}/hooks")
    jobs.cancel(accept())
    settings.MESSAGING_MCP_ALLOW_PRIVATE = False

    async def rebinding_dns(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # public at registration, loopback now: DNS is the edge of the world

    monkeypatch.setattr(outbound, "lookup", rebinding_dns)

    assert deliver_due() == ["pending"]
    delivery = WebhookDelivery.objects.get()
    assert delivery.last_error == "ConnectError: hooks.example.com resolves to 127.0.0.1, which the outbound policy refuses"
    assert receiver.requests == []


@pytest.mark.django_db
def test_registration_refuses_a_url_the_policy_refuses(settings: Any) -> None:
    settings.MESSAGING_MCP_ALLOW_PRIVATE = False
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(SystemExit):
        call_command("create_webhook", owner="alice", url="http://127.0.0.1:9/hooks", stdout=out, stderr=err)

    assert err.getvalue().strip() == "--url 127.0.0.1 is not allowed by this server's outbound policy"
    assert not WebhookEndpoint.objects.exists()


@pytest.mark.django_db
def test_the_command_prints_the_secret_once_and_the_admin_never_shows_it(admin_client: Any) -> None:
    out = io.StringIO()

    call_command("create_webhook", owner="alice", url="https://hooks.example.com/messages", stdout=out)

    created = WebhookEndpoint.objects.get()
    assert out.getvalue().splitlines()[-1] == created.secret
    assert created.secret.startswith("whsec_")
    for page in ("/admin/messaging/webhookendpoint/", f"/admin/messaging/webhookendpoint/{created.pk}/change/"):
        response = admin_client.get(page)
        assert response.status_code == 200
        assert created.secret not in response.content.decode()


@pytest.mark.django_db
def test_the_admin_shows_a_new_endpoints_secret_once(admin_client: Any, settings: Any) -> None:
    settings.MESSAGING_MCP_ALLOW_PRIVATE = False
    refused = admin_client.post("/admin/messaging/webhookendpoint/add/", {"owner": "alice", "url": "http://10.0.0.5/hooks", "is_active": "on"})
    assert "10.0.0.5 is not allowed by this server&#x27;s outbound policy" in refused.content.decode()

    response = admin_client.post("/admin/messaging/webhookendpoint/add/", {"owner": "alice", "url": "https://hooks.example.com/x", "is_active": "on"}, follow=True)

    created = WebhookEndpoint.objects.get()
    assert f"The signing secret of this endpoint is {created.secret}." in response.content.decode()
    assert created.secret not in admin_client.get(f"/admin/messaging/webhookendpoint/{created.pk}/change/").content.decode()


# --- through the worker -----------------------------------------------------------------------------

FAST_WEBHOOKS = {"MESSAGING_MCP_ALLOW_PRIVATE": "1", "MESSAGING_WEBHOOK_RETRY_BASE": "0.05", "MESSAGING_WEBHOOK_INTERVAL": "0.1"}


@pytest.fixture
def api(live_server: Any, broker: None) -> Api:
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    return Api(live_server.url, key)


@pytest.mark.e2e
def test_each_finished_message_is_told_once_through_the_worker(api: Api, start_cluster: Any, receiver: Receiver) -> None:
    hook = endpoint(receiver)
    receiver.script(500)  # the first event is told twice: at least once
    start_cluster(MESSAGING_JOB_TIMEOUT=1, **FAST_WEBHOOKS)
    completed = api.submit("hello")
    failed = api.submit(LONG_TEXT, model="echo-slow")  # past its 1 s
    cancelled = api.submit(LONG_TEXT, model="echo-slow")
    api.wait_for_status(cancelled, "processing")
    api.call("POST", f"/v1/messages/{cancelled}/cancel")

    expected = {completed: "message.completed", failed: "message.failed", cancelled: "message.cancelled"}
    wait_until(lambda: {r.event["data"]["message_id"] for r in receiver.answered() if r.answered == 200} >= set(expected), what="every event to be received")

    events = receiver.verified(hook.secret)
    told = {event["data"]["message_id"]: event["type"] for event in events}
    assert told == expected
    assert len(events) == 4  # one retried
    # The receiver answered before the worker recorded it: wait for the record.
    wait_until(lambda: WebhookDelivery.objects.filter(status=DeliveryStatus.DELIVERED).count() == 3, what="every delivery to be recorded")


@pytest.mark.e2e
def test_a_receiver_that_never_answers_does_not_hold_up_completion(api: Api, start_cluster: Any, receiver: Receiver) -> None:
    endpoint(receiver)
    receiver.script(HOLD)
    start_cluster(**FAST_WEBHOOKS)
    first = api.submit("one")
    wait_until(lambda: receiver.holding == 1, what="the receiver to hold the first event")

    second = api.submit("two")

    # Both complete while the receiver still holds the first message's event.
    assert api.wait_for_status(second, "completed")["status"] == "completed"
    assert api.message(first)["status"] == "completed" and receiver.holding == 1
    receiver.release()


@pytest.mark.e2e
def test_a_worker_killed_in_the_middle_of_a_delivery_leaves_it_to_be_delivered(api: Api, start_cluster: Any, receiver: Receiver) -> None:
    hook = endpoint(receiver)
    receiver.script(HOLD)
    cluster = start_cluster(MESSAGING_WEBHOOK_TIMEOUT=3, **FAST_WEBHOOKS)
    message_id = api.submit("tell me when done")
    worker = cluster.worker_running(message_id, attempt=1)
    wait_until(lambda: receiver.holding == 1, what="the event to be on its way")

    cluster.kill_worker(worker)
    receiver.release()

    # The delivery was claimed by the dead worker; once its claim runs out, another sends it.
    wait_until(lambda: WebhookDelivery.objects.filter(status=DeliveryStatus.DELIVERED).exists(), timeout=60, what="the event to be delivered")
    events = receiver.verified(hook.secret)
    assert {event["data"]["message_id"] for event in events} == {message_id}
    assert len({received.headers["webhook-id"] for received in receiver.requests}) == 1
    assert json.loads(receiver.requests[-1].body)["type"] == "message.completed"
