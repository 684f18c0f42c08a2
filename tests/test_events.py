"""EventRecorder: what the runner writes of a message, and when."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from messaging import runner
from messaging.events import EventRecorder, ResultTooLarge
from messaging.models import MessageJob
from tests.conftest import RUNS_THE_WORKER
from tests.test_messages import submit

START = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "echo",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 1, "output_tokens": 0}}}
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


def delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def kinds(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


def later(seconds: float) -> float:
    """A monotonic time `seconds` from now: time is passed in, not slept."""
    return time.monotonic() + seconds


def test_message_start_is_due_at_once(db: None) -> None:
    recorder = EventRecorder(token_deltas=False)

    assert recorder.add(START) is True  # the runner wakes its writer
    assert kinds(recorder.take(time.monotonic())) == ["message_start"]
    assert recorder.take(later(10)) == []


def test_a_blocks_first_delta_goes_out_with_its_start_not_a_flush_interval_later(db: None) -> None:
    recorder = EventRecorder(token_deltas=True)
    recorder.add(START)
    recorder.take(time.monotonic())

    assert recorder.add(BLOCK) is False
    assert recorder.take(later(settings.MESSAGING_FLUSH_INTERVAL)) == []  # held for its first delta
    recorder.add(delta("Hello"))

    assert kinds(recorder.take(time.monotonic())) == ["content_block_start", "content_block_delta"]


def test_a_block_start_is_not_held_past_a_check_interval(db: None) -> None:
    recorder = EventRecorder(token_deltas=True)
    recorder.add(BLOCK)

    assert kinds(recorder.take(later(settings.MESSAGING_CHECK_INTERVAL))) == ["content_block_start"]


def test_token_deltas_are_all_taken_at_each_flush(db: None) -> None:
    recorder = EventRecorder(token_deltas=True)
    recorder.add(BLOCK)
    for piece in "abc":
        recorder.add(delta(piece))

    assert kinds(recorder.take(time.monotonic())) == ["content_block_start", *["content_block_delta"] * 3]


def test_without_token_deltas_what_was_written_is_taken_merged_at_each_check(db: None) -> None:
    recorder = EventRecorder(token_deltas=False)
    recorder.add(START)
    recorder.take(time.monotonic())
    recorder.add(BLOCK)
    recorder.add(delta("Hello"))
    recorder.add(delta(" there"))
    assert recorder.take(time.monotonic()) == []  # merged and held between checks

    recorder.add(delta(","))
    taken = recorder.take(later(settings.MESSAGING_CHECK_INTERVAL))

    assert kinds(taken) == ["content_block_start", "content_block_delta"]
    assert taken[1]["delta"]["text"] == "Hello there,"


def test_events_whose_write_failed_go_out_first_with_the_next_flush(db: None) -> None:
    recorder = EventRecorder(token_deltas=True)
    recorder.add(BLOCK)
    recorder.add(delta("a"))
    failed = recorder.take(time.monotonic())
    recorder.add(delta("b"))

    recorder.put_back(failed)

    assert [event.get("delta", {}).get("text") for event in recorder.rest()] == [None, "a", "b"]


def test_an_answer_past_the_result_limit_is_stopped_before_it_is_kept(settings: Any) -> None:
    settings.MESSAGING_MAX_RESULT_CHARS = 1000
    recorder = EventRecorder(token_deltas=True)
    recorder.add(START)
    recorder.add(BLOCK)
    for _ in range(100):
        recorder.add(delta("x" * 10))  # exactly the limit

    with pytest.raises(ResultTooLarge, match="MESSAGING_MAX_RESULT_CHARS"):
        recorder.add(delta("x"))

    assert len(recorder.builder.result()["content"][0]["text"]) == 1000


@RUNS_THE_WORKER
def test_a_worker_ends_an_answer_past_the_result_limit_as_failed(alice: APIClient, settings: Any) -> None:
    settings.MESSAGING_MAX_RESULT_CHARS = 1000
    message_id = submit(alice, " ".join(["word"] * 400), max_tokens=1000)

    assert runner.run_one() == message_id

    job = MessageJob.objects.get(message_id=message_id)
    assert job.status == "failed"
    assert job.error["type"] == "invalid_output_error"
    assert "MESSAGING_MAX_RESULT_CHARS" in job.error["message"]
    assert len(job.result["content"][0]["text"]) <= 1000


@RUNS_THE_WORKER
def test_a_service_failure_before_the_model_is_called_still_ends_the_message(alice: APIClient, settings: Any) -> None:
    del settings.MESSAGING_MAX_RESULT_CHARS  # the recorder cannot be set up
    message_id = submit(alice)

    assert runner.run_one() == message_id

    job = MessageJob.objects.get(message_id=message_id)
    assert (job.status, job.error) == ("error", runner.SERVICE_FAILED)
