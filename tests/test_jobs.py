"""The status machine (messaging/jobs.py) on the database, without processes.

Tokens are read back from whichever broker is configured: rows of the ORM broker's queue
table, or the Redis list.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone
from django_q.models import OrmQ
from django_q.signing import SignedPackage

from messaging import jobs, queue
from messaging.errors import Conflict
from messaging.events import build_result
from messaging.models import MessageEvent, MessageJob, Status
from messaging.serializers import check_request

RESULT = {"id": "msg", "type": "message", "role": "assistant", "model": "echo", "content": [{"type": "text", "text": "Hi"}]}
START = {"type": "message_start", "message": {**RESULT, "content": []}}
TEXT_EVENTS = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
]


@pytest.fixture(autouse=True)
def empty_queue(broker: None) -> None:
    """Each test starts with no token in the broker, whichever it is."""


def accept(text: str = "Hello", owner: str = "alice", **fields: Any) -> MessageJob:
    checked = check_request({"messages": [{"role": "user", "content": text}], **fields}, endpoint="async")
    assert checked.valid, checked.errors
    job, created = jobs.accept(owner, checked)
    assert created
    return job


def claimed(**fields: Any) -> MessageJob:
    job = accept(**fields)
    taken = jobs.claim_next()
    assert taken is not None and taken.pk == job.pk
    return taken


def queued_tokens() -> list[str]:
    """The function each queued token calls."""
    broker = queue.shared_broker()
    if queue.QUEUE_IN_DATABASE:
        payloads = list(OrmQ.objects.filter(key=broker.list_key).order_by("id").values_list("payload", flat=True))
    else:
        payloads = broker.connection.lrange(broker.list_key, 0, -1)
    return [SignedPackage.loads(payload)["func"] for payload in payloads]


def stream(job: MessageJob) -> list[tuple[int, str, Any]]:
    """(sequence, type, status) of each event, in order."""
    rows = MessageEvent.objects.filter(job=job).order_by("sequence").values_list("sequence", "type", "data")
    return [(sequence, kind, data.get("status")) for sequence, kind, data in rows]


def expire_lease(job: MessageJob) -> None:
    MessageJob.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def in_threads(count: int, action: Callable[[], Any]) -> list[Any]:
    """Run `action` in `count` threads released at the same moment; their results."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            barrier.wait()
            results[slot] = action()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


# --- accepting ---------------------------------------------------------------------------------


def test_accept_stores_the_message_its_pending_event_and_one_token(db: None) -> None:
    job = accept("Hello there", priority=7, correlation_id="order-42")

    job.refresh_from_db()
    assert (job.status, job.priority, job.correlation_id, job.attempts, job.last_sequence) == ("pending", 7, "order-42", 0, 1)
    events = list(job.events.values_list("sequence", "type", "data"))
    assert events == [(1, "status", {"type": "status", "status": "pending", "correlation_id": "order-42"})]
    # With the ORM broker the token is a row written in the message's transaction; with Redis
    # it is pushed once the message is committed. Either way there is exactly one.
    assert queued_tokens() == [queue.TOKEN_TASK]


def test_one_waiting_token_wakes_a_worker_for_any_number_of_messages(db: None) -> None:
    accept()
    accept()
    assert queued_tokens() == [queue.TOKEN_TASK]  # the second found one waiting

    queue.shared_broker().purge_queue()  # a worker took it
    accept()

    assert queued_tokens() == [queue.TOKEN_TASK]


def test_a_message_the_broker_refuses_is_not_stored(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broker_down() -> None:
        raise ConnectionError("broker unavailable")

    monkeypatch.setattr(queue, "enqueue_token", broker_down)
    with pytest.raises(ConnectionError):
        accept()

    assert not MessageJob.objects.exists()
    assert not MessageEvent.objects.exists()


# --- claiming ----------------------------------------------------------------------------------


def test_claim_next_takes_the_highest_priority_first_then_the_oldest(db: None) -> None:
    jobs_by_name = {name: accept(name, priority=priority) for name, priority in
                    [("low1", 0), ("mid1", 5), ("high1", 10), ("mid2", 5), ("high2", 10), ("low2", 0)]}

    order = []
    while (job := jobs.claim_next()) is not None:
        order.append(next(name for name, known in jobs_by_name.items() if known.pk == job.pk))

    assert order == ["high1", "high2", "mid1", "mid2", "low1", "low2"]


def test_a_claim_starts_the_first_attempt_with_a_lease(db: None, settings: Any) -> None:
    settings.MESSAGING_LEASE_SECONDS = 30
    before = timezone.now()
    job = claimed(correlation_id="order-42")

    assert (job.status, job.attempts) == ("processing", 1)
    assert job.started_at is not None and job.started_at >= before
    assert job.lease_expires_at is not None
    assert timedelta(seconds=29) < job.lease_expires_at - before < timedelta(seconds=31)
    assert stream(job) == [(1, "status", "pending"), (2, "status", "processing")]
    assert job.events.get(sequence=2).data == {"type": "status", "status": "processing", "attempt": 1, "correlation_id": "order-42"}


def test_two_workers_claiming_one_message_never_both_win(transactional_db: None) -> None:
    for _ in range(5):
        job = accept()
        winners = [claim for claim in in_threads(2, jobs.claim_next) if claim is not None]
        assert [winner.pk for winner in winners] == [job.pk]
        assert stream(job) == [(1, "status", "pending"), (2, "status", "processing")]


def test_two_workers_rescuing_one_message_never_both_win(transactional_db: None) -> None:
    job = claimed()
    expire_lease(job)
    winners = [claim for claim in in_threads(2, jobs.claim_next) if claim is not None]

    assert len(winners) == 1
    assert winners[0].attempts == 2
    assert stream(job) == [(1, "status", "pending"), (2, "status", "processing"), (3, "status", "processing")]
    assert job.events.get(sequence=3).data["attempt"] == 2


# --- running -----------------------------------------------------------------------------------


def test_events_are_numbered_one_by_one_without_gaps(db: None) -> None:
    job = claimed()
    jobs.append_events(job.pk, 1, [START])
    jobs.append_events(job.pk, 1, [])  # a lease renewal, with nothing to record
    jobs.append_events(job.pk, 1, TEXT_EVENTS)
    jobs.append_events(job.pk, 1, [{"type": "content_block_stop", "index": 0}, {"type": "message_stop"}])
    assert jobs.complete(job, 1, RESULT)

    sequences = list(job.events.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, 9))
    job.refresh_from_db()
    assert (job.status, job.last_sequence, job.result, job.lease_expires_at) == ("completed", 8, RESULT, None)
    assert stream(job)[-1] == (8, "status", "completed")


def test_a_worker_that_lost_its_message_to_a_rescue_cannot_write(db: None) -> None:
    job = claimed()
    expire_lease(job)
    rescued = jobs.claim_next()
    assert rescued is not None and rescued.attempts == 2

    with pytest.raises(jobs.Superseded):
        jobs.append_events(job.pk, 1, [START])
    assert not jobs.complete(job, 1, RESULT)
    assert jobs.still_ours([(job.pk, 1)]) == set()
    jobs.append_events(job.pk, 2, [START])  # the new attempt's writes go through
    assert jobs.still_ours([(job.pk, 2)]) == {job.pk}


def test_one_flush_records_many_messages_and_refuses_only_the_lost_one(db: None) -> None:
    first, second, third = claimed(), claimed(), claimed()
    jobs.cancel(second)

    lost = jobs.record(
        [
            jobs.Write(first.pk, 1, [START, *TEXT_EVENTS]),
            jobs.Write(second.pk, 1, [START]),
            jobs.Write(third.pk, 1, [START], jobs.End(Status.COMPLETED, result=RESULT)),
        ]
    )

    assert lost == {second.pk}
    assert [kind for _, kind, _ in stream(first)] == ["status", "status", "message_start", "content_block_start", "content_block_delta"]
    assert stream(second)[-1] == (3, "status", "cancelled")
    third.refresh_from_db()
    assert (third.status, third.result) == ("completed", RESULT)
    assert stream(third)[2:] == [(3, "message_start", None), (4, "status", "completed")]


def test_one_renewal_keeps_the_leases_of_the_messages_still_ours_only(db: None) -> None:
    mine, taken_over = claimed(), claimed()
    expire_lease(mine)
    expire_lease(taken_over)
    MessageJob.objects.filter(pk=taken_over.pk).update(attempts=2)

    jobs.renew_leases([(mine.pk, 1), (taken_over.pk, 1)])

    assert jobs.claim_next() is not None  # the one that is not ours any more stays claimable
    mine.refresh_from_db()
    assert mine.lease_expires_at is not None and mine.lease_expires_at > timezone.now()


# --- cancelling --------------------------------------------------------------------------------


def test_appending_events_after_a_cancel_raises_superseded(db: None) -> None:
    job = claimed()
    jobs.append_events(job.pk, 1, [START])
    jobs.cancel(job)

    with pytest.raises(jobs.Superseded):
        jobs.append_events(job.pk, 1, TEXT_EVENTS)
    with pytest.raises(jobs.Superseded):
        jobs.append_events(job.pk, 1, [])
    assert stream(job)[-1] == (4, "status", "cancelled")


def test_completing_a_cancelled_message_returns_false_and_writes_nothing(db: None) -> None:
    job = claimed()
    jobs.append_events(job.pk, 1, [START, *TEXT_EVENTS])
    cancelled = jobs.cancel(job)
    events_before = stream(job)

    assert not jobs.complete(job, 1, RESULT)
    assert not jobs.fail(job, 1, Status.FAILED, {"type": "timeout_error", "message": "late"})

    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.error is None
    # The result is what the recorded events add up to, as the cancel left it.
    assert job.result == cancelled.result
    assert job.result["content"] == [{"type": "text", "text": "Hi"}]
    assert stream(job) == events_before
    assert events_before[-1] == (6, "status", "cancelled")


def test_cancelling_a_completed_message_is_a_conflict_that_says_it_completed(db: None) -> None:
    job = claimed()
    assert jobs.complete(job, 1, RESULT)

    with pytest.raises(Conflict, match="has already completed"):
        jobs.cancel(job)
    job.refresh_from_db()
    assert job.status == "completed"
    assert stream(job)[-1] == (3, "status", "completed")


def test_cancelling_a_cancelled_message_again_changes_nothing(db: None) -> None:
    job = accept()
    jobs.cancel(job)
    events_before = stream(job)

    assert jobs.cancel(job).status == "cancelled"
    assert stream(job) == events_before == [(1, "status", "pending"), (2, "status", "cancelled")]


def test_a_cancelled_message_keeps_what_its_events_recorded_and_nothing_after(db: None) -> None:
    job = claimed()
    jobs.append_events(job.pk, 1, [START, *TEXT_EVENTS])  # "Hi" is recorded

    cancelled = jobs.cancel(job)
    with pytest.raises(jobs.Superseded):
        # the runner's next write finds the message is no longer its own
        jobs.append_events(job.pk, 1, [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}}])

    job.refresh_from_db()
    assert job.result == cancelled.result
    assert job.result["content"] == [{"type": "text", "text": "Hi"}]
    assert job.result == build_result([event.data for event in job.events.order_by("sequence")])
    assert job.result["usage"]["output_tokens"] == 1  # estimated: no message_delta reported it


def test_cancel_many_cancels_only_the_pending_and_processing_messages(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "CANCEL_CHUNK", 2)  # several rounds over a small set
    pending = [accept("p1"), accept("p2"), accept("p3")]
    processing = [claimed(text="r1", priority=10), claimed(text="r2", priority=10)]
    completed = claimed(text="c", priority=10)
    jobs.complete(completed, 1, RESULT)
    failed = claimed(text="f", priority=10)
    jobs.fail(failed, 1, Status.FAILED, {"type": "timeout_error", "message": "too slow"})
    cancelled = accept("x")
    jobs.cancel(cancelled)
    finished = {job.pk: stream(job) for job in (completed, failed, cancelled)}

    assert jobs.cancel_many(MessageJob.objects.all()) == 5

    for job in pending:
        assert stream(job) == [(1, "status", "pending"), (2, "status", "cancelled")]
    for job in processing:
        assert stream(job) == [(1, "status", "pending"), (2, "status", "processing"), (3, "status", "cancelled")]
    for job in pending + processing:
        job.refresh_from_db()
        assert (job.status, job.last_sequence) == ("cancelled", len(stream(job)))
        assert job.finished_at is not None and job.lease_expires_at is None
    assert {job.pk: stream(job) for job in (completed, failed, cancelled)} == finished
    assert dict(MessageJob.objects.filter(pk__in=finished).values_list("message_id", "status")) == {
        completed.message_id: "completed",
        failed.message_id: "failed",
        cancelled.message_id: "cancelled",
    }
    assert jobs.cancel_many(MessageJob.objects.all()) == 0


# --- recovering --------------------------------------------------------------------------------


def test_a_message_with_a_live_lease_is_left_alone(db: None) -> None:
    claimed()
    assert jobs.claim_next() is None


def test_a_message_whose_lease_ran_out_is_claimed_again_ahead_of_a_lower_priority_backlog(db: None) -> None:
    job = claimed(priority=9)
    backlog = [accept(priority=5) for _ in range(3)]
    expire_lease(job)

    rescued = jobs.claim_next()

    assert rescued is not None and (rescued.pk, rescued.attempts, rescued.status) == (job.pk, 2, "processing")
    assert stream(job)[-1] == (3, "status", "processing")
    assert job.events.get(sequence=3).data["attempt"] == 2
    assert [claim.pk for claim in jobs.claim(10)] == [waiting.pk for waiting in backlog]


def test_a_message_that_lost_its_worker_too_often_ends_as_error_keeping_its_words(db: None, settings: Any) -> None:
    settings.MESSAGING_MAX_ATTEMPTS = 2
    job = claimed()
    jobs.append_events(job.pk, 1, [START, *TEXT_EVENTS])
    expire_lease(job)
    assert jobs.claim_next() is not None
    expire_lease(job)

    assert jobs.claim_next() is None

    job.refresh_from_db()
    assert (job.status, job.attempts, job.lease_expires_at) == ("error", 2, None)
    assert job.error["type"] == "api_error"
    assert "2 times" in job.error["message"]
    assert job.result["content"] == [{"type": "text", "text": "Hi"}]
    assert [kind for _, kind, _ in stream(job)][-2:] == ["error", "status"]
    assert stream(job)[-1][2] == "error"
    # Nothing more to do, ever.
    assert jobs.claim_next() is None


def test_a_message_handed_back_by_a_stopping_worker_is_pending_again_and_not_a_failure(db: None, settings: Any) -> None:
    settings.MESSAGING_MAX_ATTEMPTS = 2
    job = claimed()
    queue.shared_broker().purge_queue()

    assert jobs.hand_back([(job.pk, 1)]) == 1
    assert jobs.hand_back([(job.pk, 1)]) == 0  # once

    job.refresh_from_db()
    assert (job.status, job.attempts, job.handed_back, job.lease_expires_at) == ("pending", 1, 1, None)
    assert job.events.get(sequence=3).data == {"type": "status", "status": "pending", "reason": "worker_stopped"}
    assert queued_tokens() == [queue.TOKEN_TASK]  # another worker is woken for it
    again = jobs.claim_next()
    assert again is not None and again.attempts == 2
    # Its worker dies now: one failure out of two allowed, so it is taken up again.
    expire_lease(job)
    rescued = jobs.claim_next()
    assert rescued is not None and rescued.attempts == 3


# --- terminal statuses -------------------------------------------------------------------------


def _completed() -> MessageJob:
    job = claimed()
    jobs.complete(job, 1, RESULT)
    return job


def _failed() -> MessageJob:
    job = claimed()
    jobs.fail(job, 1, Status.FAILED, {"type": "timeout_error", "message": "too slow"}, RESULT)
    return job


def _errored() -> MessageJob:
    job = claimed()
    jobs.fail(job, 1, Status.ERROR, {"type": "api_error", "message": "broken"})
    return job


def _cancelled() -> MessageJob:
    job = claimed()
    jobs.cancel(job)
    return job


@pytest.mark.parametrize("finish", [_completed, _failed, _errored, _cancelled], ids=["completed", "failed", "error", "cancelled"])
def test_a_terminal_status_never_changes(db: None, finish: Callable[[], MessageJob]) -> None:
    job = finish()
    job.refresh_from_db()
    fields = ("status", "attempts", "result", "error", "finished_at", "last_sequence")
    before = {field: getattr(job, field) for field in fields}
    events_before = stream(job)
    # A lease left behind must not be what protects it.
    expire_lease(job)

    assert jobs.claim_next() is None
    with pytest.raises(jobs.Superseded):
        jobs.append_events(job.pk, 1, [START])
    assert jobs.still_ours([(job.pk, 1)]) == set()
    jobs.renew_leases([(job.pk, 1)])
    assert not jobs.complete(job, 1, RESULT)
    assert not jobs.fail(job, 1, Status.ERROR, {"type": "api_error", "message": "again"})
    assert jobs.hand_back([(job.pk, 1)]) == 0
    if before["status"] == "cancelled":
        jobs.cancel(job)
    else:
        with pytest.raises(Conflict):
            jobs.cancel(job)
    assert jobs.cancel_many(MessageJob.objects.all()) == 0

    job.refresh_from_db()
    assert {field: getattr(job, field) for field in fields} == before
    assert stream(job) == events_before
