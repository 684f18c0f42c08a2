"""POST /v1/messages/{message_id}/cancel."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from messaging import jobs, runner
from messaging.models import MessageJob
from tests.conftest import RUNS_THE_WORKER
from tests.test_messages import submit


def cancel(client: APIClient, message_id: str):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/messages/{message_id}/cancel")


def event_types(message_id: str) -> list[str]:
    job = MessageJob.objects.get(message_id=message_id)
    return [data.get("status", data["type"]) for data in job.events.order_by("sequence").values_list("data", flat=True)]


def test_it_cancels_a_pending_message_which_then_never_runs(alice: APIClient) -> None:
    message_id = submit(alice)

    response = cancel(alice, message_id)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert runner.run_one() == "idle"
    assert event_types(message_id) == ["pending", "cancelled"]
    assert MessageJob.objects.get(message_id=message_id).attempts == 0


def test_it_answers_200_again_for_a_cancelled_message(alice: APIClient) -> None:
    message_id = submit(alice)
    cancel(alice, message_id)

    response = cancel(alice, message_id)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert event_types(message_id) == ["pending", "cancelled"]


@RUNS_THE_WORKER
def test_it_refuses_to_cancel_a_completed_message(alice: APIClient) -> None:
    message_id = submit(alice)
    runner.run_one()

    response = cancel(alice, message_id)

    assert response.status_code == 409
    assert response.json()["error"] == {
        "type": "conflict_error",
        "message": f"Message {message_id} has already completed; it cannot be cancelled.",
    }
    assert MessageJob.objects.get(message_id=message_id).status == "completed"


@pytest.mark.parametrize("status", ["failed", "error"])
def test_it_refuses_to_cancel_a_failed_or_errored_message(alice: APIClient, status: str) -> None:
    message_id = submit(alice)
    job = jobs.claim_next()
    assert job is not None
    jobs.fail(job, job.attempts, status, {"type": "api_error", "message": "boom"})

    response = cancel(alice, message_id)

    assert response.status_code == 409
    assert MessageJob.objects.get(message_id=message_id).status == status


def test_it_cancels_a_processing_message_and_keeps_what_it_produced(alice: APIClient) -> None:
    message_id = submit(alice, "partial answer here")
    job = jobs.claim_next()
    assert job is not None
    jobs.append_events(job.pk, job.attempts, [
        {"type": "message_start", "message": {"id": message_id, "type": "message", "role": "assistant", "model": "echo",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 5, "output_tokens": 0}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial "}},
    ])

    response = cancel(alice, message_id)

    assert response.status_code == 200
    state = response.json()
    assert state["status"] == "cancelled"
    assert state["result"]["content"] == [{"type": "text", "text": "partial "}]
    # The worker's next write finds the message gone and stops.
    with pytest.raises(jobs.Superseded):
        jobs.append_events(job.pk, job.attempts, [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "more"}}])
    assert event_types(message_id)[-1] == "cancelled"


def test_a_completion_after_the_cancel_loses(alice: APIClient) -> None:
    message_id = submit(alice)
    job = jobs.claim_next()
    assert job is not None
    cancel(alice, message_id)

    assert jobs.complete(job, job.attempts, {"content": []}) is False
    assert MessageJob.objects.get(message_id=message_id).status == "cancelled"
    assert event_types(message_id) == ["pending", "processing", "cancelled"]


def test_it_hides_another_owners_message(alice: APIClient, bob: APIClient) -> None:
    message_id = submit(alice)

    response = cancel(bob, message_id)

    assert response.status_code == 404
    assert MessageJob.objects.get(message_id=message_id).status == "pending"
