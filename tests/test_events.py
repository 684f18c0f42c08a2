"""EventRecorder: what a worker writes, and when."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from messaging import jobs, tasks
from messaging.events import EventRecorder, ResultTooLarge
from messaging.models import MessageEvent, MessageJob
from tests.conftest import RUNS_THE_WORKER
from tests.test_messages import submit

START = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "echo",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 1, "output_tokens": 0}}}
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


def delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def written(job_pk: int) -> list[str]:
    return list(MessageEvent.objects.filter(job_id=job_pk, type__in=["message_start", "content_block_start", "content_block_delta"])
                .order_by("sequence").values_list("type", flat=True))


def quiet_for_longer_than_a_flush_interval(recorder: EventRecorder) -> None:
    """Time injected, not slept: past the flush interval, short of the heartbeat check."""
    recorder._last_write -= (settings.MESSAGING_FLUSH_INTERVAL + settings.MESSAGING_CHECK_INTERVAL) / 2


def recorder_for(client: APIClient, *, token_deltas: bool) -> EventRecorder:
    submit(client)
    job = jobs.claim_next()
    assert job is not None
    return EventRecorder(job.pk, job.attempts, token_deltas=token_deltas)


def test_message_start_is_written_at_once(alice: APIClient) -> None:
    recorder = recorder_for(alice, token_deltas=False)

    recorder.add(START)

    assert written(recorder.job_pk) == ["message_start"]


def test_a_blocks_first_delta_goes_out_with_its_start_not_a_flush_interval_later(alice: APIClient) -> None:
    recorder = recorder_for(alice, token_deltas=True)
    recorder.add(START)
    quiet_for_longer_than_a_flush_interval(recorder)

    recorder.add(BLOCK)
    assert written(recorder.job_pk) == ["message_start"]  # held for its first delta
    recorder.add(delta("Hello"))

    assert written(recorder.job_pk) == ["message_start", "content_block_start", "content_block_delta"]


def test_deltas_that_come_quickly_are_batched(alice: APIClient) -> None:
    recorder = recorder_for(alice, token_deltas=True)
    recorder.add(START)
    quiet_for_longer_than_a_flush_interval(recorder)
    recorder.add(BLOCK)
    recorder.add(delta("a"))  # written with the block start

    recorder.add(delta("b"))
    recorder.add(delta("c"))
    assert written(recorder.job_pk).count("content_block_delta") == 1
    recorder.flush()

    assert written(recorder.job_pk).count("content_block_delta") == 3


def test_without_token_deltas_what_was_written_is_recorded_merged_at_each_check(alice: APIClient) -> None:
    recorder = recorder_for(alice, token_deltas=False)
    recorder.add(START)
    recorder.add(BLOCK)
    recorder.add(delta("Hello"))
    recorder.add(delta(" there"))
    assert written(recorder.job_pk) == ["message_start"]  # merged and held between checks

    recorder._last_write -= settings.MESSAGING_CHECK_INTERVAL  # time injected: a check is due
    recorder.add(delta(","))

    assert written(recorder.job_pk) == ["message_start", "content_block_start", "content_block_delta"]
    text = MessageEvent.objects.get(job_id=recorder.job_pk, type="content_block_delta").data["delta"]["text"]
    assert text == "Hello there,"


def test_an_answer_past_the_result_limit_is_stopped_before_it_is_kept(alice: APIClient, settings: Any) -> None:
    settings.MESSAGING_MAX_RESULT_CHARS = 1000
    recorder = recorder_for(alice, token_deltas=True)
    recorder.add(START)
    recorder.add(BLOCK)
    for _ in range(100):
        recorder.add(delta("x" * 10))  # exactly the limit

    with pytest.raises(ResultTooLarge, match="MESSAGING_MAX_RESULT_CHARS"):
        recorder.add(delta("x"))
    recorder.flush()

    assert len(recorder.builder.result()["content"][0]["text"]) == 1000


@RUNS_THE_WORKER
def test_a_worker_ends_an_answer_past_the_result_limit_as_failed(alice: APIClient, settings: Any) -> None:
    settings.MESSAGING_MAX_RESULT_CHARS = 1000
    message_id = submit(alice, " ".join(["word"] * 400), max_tokens=1000)

    assert tasks.process_next() == message_id

    job = MessageJob.objects.get(message_id=message_id)
    assert job.status == "failed"
    assert job.error["type"] == "invalid_output_error"
    assert "MESSAGING_MAX_RESULT_CHARS" in job.error["message"]
    assert len(job.result["content"][0]["text"]) <= 1000


@RUNS_THE_WORKER
def test_a_service_failure_before_the_model_is_called_still_ends_the_message(alice: APIClient, settings: Any) -> None:
    del settings.MESSAGING_MAX_RESULT_CHARS  # the recorder cannot be set up
    message_id = submit(alice)

    assert tasks.process_next() == message_id

    job = MessageJob.objects.get(message_id=message_id)
    assert (job.status, job.error) == ("error", tasks.SERVICE_FAILED)
