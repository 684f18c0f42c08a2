"""The worker design end to end: real HTTP, a real `qcluster`, real SIGKILLs.

Messages are submitted over HTTP to pytest-django's live server and run by a cluster started
on the same test database (tests/processes.py). A killed worker's message must be taken up
again through its lease, whichever broker is configured: the Redis broker forgets a killed
worker's task, and the ORM broker would only hand it out again after `retry` (minutes).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any

import pytest

from messaging.events import build_result
from messaging.models import APIKey, MessageEvent, MessageJob, WorkerHeartbeat
from tests.processes import LEASE_SECONDS, RECOVERY_INTERVAL, wait_until

pytestmark = pytest.mark.e2e

# At the cluster's 0.05 s per word, `echo-slow` takes about 3 s for LONG_TEXT (stopped early
# by the tests that use it) and 1.5 s for SHORT_TEXT (run through, maybe twice).
LONG_TEXT = " ".join(f"word{number}" for number in range(1, 61))
SHORT_TEXT = " ".join(f"word{number}" for number in range(1, 31))


class Api:
    def __init__(self, base_url: str, key: str):
        self.base_url = base_url
        self.key = key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def submit(self, text: str, **fields: Any) -> str:
        status, body = self.call("POST", "/v1/messages/async", {"messages": [{"role": "user", "content": text}], **fields})
        assert status == 202, body
        return body["message_id"]

    def message(self, message_id: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/messages/{message_id}")
        assert status == 200, body
        return body

    def wait_for_status(self, message_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(
            lambda: state if (state := self.message(message_id))["status"] in statuses else None,
            timeout=timeout,
            what=f"{message_id} to be {' or '.join(statuses)}",
        )


@pytest.fixture
def api(live_server: Any, broker: None) -> Api:
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    return Api(live_server.url, key)


def events(message_id: str) -> list[dict[str, Any]]:
    rows = MessageEvent.objects.filter(job__message_id=message_id).order_by("sequence").values_list("sequence", "data")
    return [{**data, "sequence": sequence} for sequence, data in rows]


def statuses(stream: list[dict[str, Any]]) -> list[str]:
    return [event["status"] for event in stream if event["type"] == "status"]


def text_of(result: dict[str, Any] | None) -> str:
    assert result is not None
    return "".join(block.get("text", "") for block in result["content"] if block["type"] == "text")


def deltas_recorded(message_id: str, at_least: int) -> bool:
    return MessageEvent.objects.filter(job__message_id=message_id, type="content_block_delta").count() >= at_least


def test_messages_sent_over_http_complete_with_the_echo_and_a_numbered_stream(api: Api, start_cluster: Any) -> None:
    start_cluster(MESSAGING_WORKERS=2)
    texts = {"Hello there, echo": {}, "Stream me word by word": {"stream": True}, "A third one": {"model": "echo-slow"}}
    sent = {api.submit(text, **fields): text for text, fields in texts.items()}

    for message_id, text in sent.items():
        state = api.wait_for_status(message_id, "completed")
        assert state["attempts"] == 1
        assert state["error"] is None
        assert text_of(state["result"]) == text
        assert state["result"]["stop_reason"] == "end_turn"

        stream = events(message_id)
        assert [event["sequence"] for event in stream] == list(range(1, len(stream) + 1))
        assert MessageJob.objects.get(message_id=message_id).last_sequence == len(stream)
        assert statuses(stream) == ["pending", "processing", "completed"]
        assert [event["type"] for event in stream[:3]] == ["status", "status", "message_start"]
        assert stream[1]["attempt"] == 1
        assert [event["type"] for event in stream[-2:]] == ["message_stop", "status"]


def test_a_message_whose_worker_is_killed_is_taken_up_again_and_completes_once(api: Api, start_cluster: Any) -> None:
    cluster = start_cluster(MESSAGING_WORKERS=2)
    message_id = api.submit(SHORT_TEXT, model="echo-slow", stream=True)
    first = cluster.worker_running(message_id, attempt=1)
    wait_until(lambda: deltas_recorded(message_id, 5), what="the first attempt to be half-way")

    cluster.kill_worker(first)

    state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
    assert state["status"] == "completed"
    assert state["attempts"] == 2
    assert text_of(state["result"]) == SHORT_TEXT
    assert cluster.worker_running(message_id, attempt=2) != first

    stream = events(message_id)
    assert [event["sequence"] for event in stream] == list(range(1, len(stream) + 1))
    assert statuses(stream) == ["pending", "processing", "processing", "completed"]
    processing = [index for index, event in enumerate(stream) if event.get("status") == "processing"]
    assert [stream[index]["attempt"] for index in processing] == [1, 2]
    starts = [index for index, event in enumerate(stream) if event["type"] == "message_start"]
    assert len(starts) == 2
    assert processing[0] < starts[0] < processing[1] < starts[1]
    # The first attempt's words are still in the stream, before the second start.
    assert any(event["type"] == "content_block_delta" for event in stream[starts[0] : processing[1]])


def test_messages_queued_when_the_whole_cluster_is_killed_still_complete(api: Api, start_cluster: Any) -> None:
    cluster = start_cluster()
    running = api.submit(SHORT_TEXT, model="echo-slow", stream=True)
    cluster.worker_running(running, attempt=1)
    # Queued behind it: the cluster prefetches their tokens, and a killed cluster loses them.
    queued = [api.submit(f"queued {number}") for number in range(3)]
    wait_until(lambda: deltas_recorded(running, 5), what="the running message to be half-way")

    cluster.kill()
    start_cluster()

    for message_id in queued:
        state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
        assert (state["status"], state["attempts"]) == ("completed", 1)
    state = api.wait_for_status(running, "completed", "failed", "error", "cancelled")
    assert (state["status"], state["attempts"], text_of(state["result"])) == ("completed", 2, SHORT_TEXT)


def test_a_live_worker_keeps_its_message_while_the_model_is_silent_longer_than_the_lease(
    api: Api,
    start_cluster: Any,
) -> None:
    # The word comes after a silence longer than the lease; a second worker is there to take
    # the message over if its lease ran out.
    start_cluster(MESSAGING_ECHO_SLOW_DELAY=LEASE_SECONDS + 0.5, MESSAGING_WORKERS=2)
    message_id = api.submit("slowly", model="echo-slow", stream=True)

    state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
    assert (state["status"], state["attempts"]) == ("completed", 1), state
    assert text_of(state["result"]) == "slowly"
    assert statuses(events(message_id)) == ["pending", "processing", "completed"]


def test_a_higher_priority_message_starts_before_an_earlier_backlog(api: Api, start_cluster: Any) -> None:
    low = [api.submit(f"low {number}", priority=0) for number in range(6)]
    high = api.submit("high", priority=10)

    # One slot: each start is a choice of the next message.
    start_cluster(MESSAGING_WORKERS=1, MESSAGING_CONCURRENCY=1)

    for message_id in [*low, high]:
        api.wait_for_status(message_id, "completed")
    order = MessageJob.objects.order_by("started_at").values_list("message_id", flat=True)
    assert list(order) == [high, *low]


def test_a_message_that_keeps_losing_its_worker_ends_as_error_and_is_not_run_again(
    api: Api,
    start_cluster: Any,
) -> None:
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_MAX_ATTEMPTS=2)
    message_id = api.submit(SHORT_TEXT, model="echo-slow", stream=True)
    for attempt in (1, 2):
        pid = cluster.worker_running(message_id, attempt=attempt)
        wait_until(
            lambda: MessageJob.objects.filter(message_id=message_id, attempts=attempt, status="processing").exists()
            and events(message_id)[-1]["type"] == "content_block_delta",
            what=f"attempt {attempt} to be producing words",
        )
        cluster.kill_worker(pid)

    state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
    assert state["status"] == "error"
    assert state["attempts"] == 2
    assert state["error"]["type"] == "api_error"
    stream = events(message_id)
    assert statuses(stream) == ["pending", "processing", "processing", "error"]
    assert [event["type"] for event in stream[-2:]] == ["error", "status"]
    assert stream[-2]["error"] == state["error"]

    # Let the runners look again, well after the lease of the last attempt ran out.
    finished = MessageJob.objects.get(message_id=message_id).finished_at
    assert finished is not None
    wait_until(
        lambda: WorkerHeartbeat.objects.filter(
            seen_at__gt=finished + timedelta(seconds=LEASE_SECONDS + 2 * RECOVERY_INTERVAL)
        ).exists(),
        what="the runners to run a few rounds after the message ended",
    )
    assert events(message_id) == stream
    assert api.message(message_id)["attempts"] == 2
    assert f"message {message_id} attempt 3" not in cluster.log()


def test_a_message_running_past_its_time_limit_fails_and_keeps_its_words(api: Api, start_cluster: Any) -> None:
    # 3 s of a 15 s answer: even a worker slowed down by a loaded machine has said something.
    start_cluster(MESSAGING_JOB_TIMEOUT=3)
    text = " ".join(f"word{number}" for number in range(1, 301))
    message_id = api.submit(text, model="echo-slow")

    state = api.wait_for_status(message_id, "completed", "failed", "error", "cancelled")
    assert state["status"] == "failed"
    assert state["error"]["type"] == "timeout_error"
    partial = text_of(state["result"])
    assert partial and text.startswith(partial) and partial != text
    stream = events(message_id)
    assert statuses(stream) == ["pending", "processing", "failed"]
    assert [event["type"] for event in stream[-2:]] == ["error", "status"]
    assert state["result"] == build_result(stream)
    assert state["result"]["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["final-only", "token-deltas"])
def test_cancelling_a_running_message_stops_its_worker_and_keeps_the_partial_result(
    api: Api,
    start_cluster: Any,
    stream: bool,
) -> None:
    start_cluster()
    message_id = api.submit(LONG_TEXT, model="echo-slow", stream=stream)
    # Both modes record what the model wrote at least every check interval.
    wait_until(
        lambda: any(event["type"] == "content_block_delta" for event in events(message_id)),
        what="the message to be a few words in",
    )

    status, cancelled = api.call("POST", f"/v1/messages/{message_id}/cancel")
    assert status == 200, cancelled
    assert cancelled["status"] == "cancelled"
    # On the cluster's one worker, this runs only once the cancelled message let go of it.
    after = api.submit("after the cancel")
    assert api.wait_for_status(after, "completed", "failed", "error")["status"] == "completed"

    # The terminal state never changes: the worker that ran on until it noticed adds nothing.
    state = api.message(message_id)
    assert state == cancelled
    assert state["error"] is None
    partial = text_of(state["result"])
    assert partial and LONG_TEXT.startswith(partial) and partial != LONG_TEXT
    recorded = events(message_id)
    assert [event["sequence"] for event in recorded] == list(range(1, len(recorded) + 1))
    assert statuses(recorded) == ["pending", "processing", "cancelled"]
    assert recorded[-1]["type"] == "status"
    # The result is what the recorded events add up to, usage included.
    assert state["result"] == build_result(recorded)
    assert state["result"]["usage"]["output_tokens"] >= len(partial.split())


def test_a_message_cancelled_while_pending_never_runs(api: Api, start_cluster: Any) -> None:
    cancelled = api.submit("never run me")
    status, body = api.call("POST", f"/v1/messages/{cancelled}/cancel")
    assert (status, body["status"]) == (200, "cancelled")
    marker = api.submit("run me")

    start_cluster()
    # Same priority, and the cancelled message is older: had it been claimable, the first
    # token would have run it before the marker.
    api.wait_for_status(marker, "completed")

    state = api.message(cancelled)
    assert state["status"] == "cancelled"
    assert state["attempts"] == 0
    assert state["started_at"] is None
    assert state["result"] is None
    assert statuses(events(cancelled)) == ["pending", "cancelled"]


def test_readyz_turns_ready_once_a_worker_has_written_a_heartbeat(api: Api, start_cluster: Any) -> None:
    def readyz() -> tuple[int, dict[str, Any]]:
        return api.call("GET", "/readyz")

    status, body = readyz()
    assert status == 503
    assert body["checks"]["worker"] != "ok"
    assert body["checks"]["database"] == "ok"

    cluster = start_cluster()
    status, body = wait_until(lambda: answer if (answer := readyz())[0] == 200 else None, what="/readyz to turn 200")
    assert body["status"] == "ready"
    assert set(body["checks"].values()) == {"ok"}
    assert cluster.worker_pids()  # the heartbeat is the cluster's worker's


def test_a_cancel_stops_a_model_in_the_middle_of_a_long_silence(api: Api, start_cluster: Any) -> None:
    cluster = start_cluster(MESSAGING_ECHO_SLOW_DELAY="600")  # ten minutes per word
    message_id = api.submit("never finished", model="echo-slow")
    api.wait_for_status(message_id, "processing")

    assert api.call("POST", f"/v1/messages/{message_id}/cancel")[0] == 200

    # The one worker is free again at once, not after the model's ten-minute silence.
    follower = api.submit("next in line")
    assert api.wait_for_status(follower, "completed")["result"] is not None
    assert cluster.worker_pids()


def test_a_silent_model_past_its_time_limit_fails_as_a_timeout(api: Api, start_cluster: Any) -> None:
    start_cluster(MESSAGING_ECHO_SLOW_DELAY="600", MESSAGING_JOB_TIMEOUT="1")
    message_id = api.submit("never finished", model="echo-slow")

    state = api.wait_for_status(message_id, "failed", "error")

    assert state["status"] == "failed"
    assert state["error"]["type"] == "timeout_error"
