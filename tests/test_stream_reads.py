"""How a stream reads a message's events (messaging.streaming._read_events), without processes."""

from __future__ import annotations

from typing import Any

import pytest

from messaging import jobs, streaming
from tests.test_jobs import RESULT, claimed


@pytest.mark.django_db(transaction=True)
def test_a_message_that_ends_between_the_two_reads_still_gives_its_last_events(
    broker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = claimed()  # events 1 (pending) and 2 (processing)
    read_status = streaming._status

    def completed_just_before(job_pk: int) -> Any:
        # The worker commits the end after the stream found no new event, before it reads the status.
        jobs.complete(job, job.attempts, RESULT)
        return read_status(job_pk)

    monkeypatch.setattr(streaming, "_status", completed_just_before)

    rows, status = streaming._read_events(job.pk, 2)

    assert status == "completed"
    assert [(sequence, kind, data["status"]) for sequence, kind, data in rows] == [(3, "status", "completed")]


@pytest.mark.django_db(transaction=True)
def test_a_message_finished_before_the_resume_point_gives_nothing(broker: None) -> None:
    job = claimed()
    jobs.complete(job, job.attempts, RESULT)

    assert streaming._read_events(job.pk, 3) == ([], "completed")
