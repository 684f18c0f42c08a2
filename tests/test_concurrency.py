"""Many messages in flight per process: real `qcluster` and uvicorn processes against a local
model server of fixed latency that counts the requests it holds at once.

Nothing here asserts a duration: concurrency is proven by the upstream's peak count of
requests in flight, order by the recorded events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from messaging import catalog
from messaging.models import APIKey, MessageEvent, MessageJob
from tests.latency_upstream import LatencyUpstream, start_latency_upstream  # noqa: F401 (a fixture)
from tests.processes import LEASE_SECONDS, Cluster, Server, wait_until
from tests.test_worker import Api, api, events, statuses  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "error", "cancelled")


@pytest.fixture
def models_file(settings: Any) -> Iterator[Callable[[Path, LatencyUpstream], str]]:
    """`models_file(tmp_path, upstream)`: a models file with the model `slow` on `upstream`, in
    force in this process (the API checks the model) and for the processes given its path."""

    def write(directory: Path, upstream: LatencyUpstream) -> str:
        path = directory / "models.toml"
        path.write_text(f'[models.slow]\nprovider = "openai"\nbase_url = "{upstream.base_url}"\nmax_tokens = 100\n')
        settings.MESSAGING_MODELS_FILE = str(path)
        catalog.models.cache_clear()
        return str(path)

    yield write
    catalog.models.cache_clear()


def submit_many(api: Api, count: int, **fields: Any) -> list[str]:
    return [api.submit(f"message {number}", model="slow", **fields) for number in range(count)]


def all_finished(message_ids: list[str]) -> bool:
    return MessageJob.objects.filter(message_id__in=message_ids, status__in=TERMINAL).count() == len(message_ids)


def assert_each_ran_to_completion_once(message_ids: list[str], attempts: int = 1) -> None:
    for message_id in message_ids:
        job = MessageJob.objects.get(message_id=message_id)
        assert (job.status, job.attempts) == ("completed", attempts), (message_id, job.status, job.attempts, job.error)
        stream = events(message_id)
        assert [event["sequence"] for event in stream] == list(range(1, len(stream) + 1))
        assert [status for status in statuses(stream) if status in TERMINAL] == ["completed"]
        assert job.result["content"][0]["text"].strip().startswith("word0")


def starts_in_order(message_ids: list[str]) -> list[str]:
    """The messages in the order their last attempt started (the event rows' order)."""
    rows = MessageEvent.objects.filter(job__message_id__in=message_ids, type="status", data__status="processing").order_by("id")
    last_start = {message_id: position for position, message_id in enumerate(rows.values_list("job__message_id", flat=True))}
    return sorted(last_start, key=last_start.__getitem__)


def test_one_worker_process_runs_hundreds_of_messages_at_once(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=2, words=3)
    start_cluster(MESSAGING_WORKERS=1, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))

    message_ids = submit_many(api, 200)

    wait_until(lambda: all_finished(message_ids), timeout=120, what="200 messages to finish")
    assert_each_ran_to_completion_once(message_ids)
    # One process, and most of them were waiting on the model together.
    assert upstream.stats()["peak"] >= 150, upstream.stats()


def test_sigkill_of_a_worker_with_many_in_flight_loses_none_and_runs_each_once_more(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=3, words=3)
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))
    message_ids = submit_many(api, 100)
    worker = cluster.worker_running(message_ids[0], attempt=1)
    wait_until(lambda: upstream.stats()["current"] == 100, what="all 100 to be waiting on the model")

    cluster.kill_worker(worker)

    wait_until(lambda: all_finished(message_ids), timeout=120, what="100 rescued messages to finish")
    assert_each_ran_to_completion_once(message_ids, attempts=2)
    for message_id in message_ids:
        assert statuses(events(message_id)) == ["pending", "processing", "processing", "completed"]


def test_a_rescued_high_priority_message_goes_before_the_lower_priority_backlog(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=1, words=2)
    # One slot: every start below is a choice of what to run next.
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_CONCURRENCY=1, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))
    urgent = api.submit("urgent", model="slow", priority=10)
    cluster.worker_running(urgent, attempt=1)
    backlog = submit_many(api, 8, priority=0)

    # Its worker dies with its whole cluster (a machine lost), and another cluster takes over.
    cluster.kill()
    start_cluster(MESSAGING_WORKERS=1, MESSAGING_CONCURRENCY=1, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))

    wait_until(lambda: all_finished([urgent, *backlog]), timeout=120, what="the backlog to drain")
    assert MessageJob.objects.get(message_id=urgent).attempts == 2
    # The new cluster may start one message of the backlog while the dead one's lease still
    # runs (1.5 s), but the urgent one is next: it does not wait behind the backlog.
    assert starts_in_order([urgent, *backlog]).index(urgent) <= 1


def test_priority_holds_as_slots_free_up_under_a_backlog(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=0.5, words=2)
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_CONCURRENCY=2, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))
    first = submit_many(api, 2, priority=5)
    cluster.worker_running(first[1], attempt=1)
    low = submit_many(api, 4, priority=1)
    high = submit_many(api, 4, priority=9)

    wait_until(lambda: all_finished([*first, *low, *high]), timeout=60, what="the backlog to drain")
    order = starts_in_order([*low, *high])
    assert set(order[:4]) == set(high), order


def test_cancelling_one_of_many_in_flight_stops_it_and_closes_its_request_the_others_complete(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=4, words=2)
    start_cluster(MESSAGING_WORKERS=1, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))
    message_ids = submit_many(api, 20)
    wait_until(lambda: upstream.stats()["current"] == 20, what="all 20 to be waiting on the model")

    status, body = api.call("POST", f"/v1/messages/{message_ids[0]}/cancel")
    assert (status, body["status"]) == (200, "cancelled")

    # Its request closes while the model is still silent for the others.
    wait_until(lambda: upstream.stats()["disconnects"] == 1, what="the cancelled message's request to close")
    assert upstream.stats()["completed"] == 0
    wait_until(lambda: all_finished(message_ids[1:]), timeout=60, what="the other 19 to finish")
    assert_each_ran_to_completion_once(message_ids[1:])
    assert upstream.stats()["disconnects"] == 1
    assert statuses(events(message_ids[0])) == ["pending", "processing", "cancelled"]


def test_sigterm_lets_messages_in_flight_finish_within_the_drain_time(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=1, words=2)
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_DRAIN_SECONDS=15, MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))
    message_ids = submit_many(api, 10)
    wait_until(lambda: upstream.stats()["current"] == 10, what="all 10 to be waiting on the model")

    cluster.stop()

    assert_each_ran_to_completion_once(message_ids)


def test_sigterm_hands_back_what_cannot_finish_in_time_and_another_worker_completes_it(
    api: Api, start_cluster: Callable[..., Cluster], start_latency_upstream: Callable[..., LatencyUpstream], tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=4, words=2)
    models = models_file(tmp_path, upstream)
    cluster = start_cluster(MESSAGING_WORKERS=1, MESSAGING_DRAIN_SECONDS=0.2, MESSAGING_MODELS_FILE=models)
    message_ids = submit_many(api, 10)
    wait_until(lambda: upstream.stats()["current"] == 10, what="all 10 to be waiting on the model")

    cluster.stop()

    for message_id in message_ids:
        job = MessageJob.objects.get(message_id=message_id)
        assert (job.status, job.attempts, job.handed_back, job.lease_expires_at) == ("pending", 1, 1, None)
        assert statuses(events(message_id)) == ["pending", "processing", "pending"]
        assert events(message_id)[-1]["reason"] == "worker_stopped"
    wait_until(lambda: upstream.stats()["disconnects"] == 10, what="their upstream requests to close")

    start_cluster(MESSAGING_WORKERS=1, MESSAGING_MAX_ATTEMPTS=1, MESSAGING_MODELS_FILE=models)

    wait_until(lambda: all_finished(message_ids), timeout=60, what="the handed-back messages to finish")
    # A handed-back attempt is not a failure: one attempt allowed, and they still ran again.
    assert_each_ran_to_completion_once(message_ids, attempts=2)


async def _stream_texts(url: str, key: str, count: int, *, leave: int | None = None) -> list[str | None]:
    """`count` concurrent streaming POST /v1/messages; the `leave`-th client goes away once its
    message has started. Each answer's text, None for the one that left."""
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=None)

    async def one(client: httpx.AsyncClient, number: int) -> str | None:
        text = ""
        async with client.stream("POST", f"{url}/v1/messages", json=body, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if number == leave and line.startswith("event: message_start"):
                    return None  # leaving: the response closes
                if '"text_delta"' in line:
                    text += line.split('"text":"', 1)[1].split('"', 1)[0]
        return text

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, number) for number in range(count))))


@pytest.fixture
def key(transactional_db: None) -> str:
    return APIKey.objects.create_key(name="alice", owner="alice")[1]


def test_one_web_process_holds_many_synchronous_streams_and_a_client_leaving_cancels_only_its_own(
    start_server: Callable[..., Server], start_latency_upstream: Callable[..., LatencyUpstream], key: str, tmp_path: Path, models_file: Callable[..., str]
) -> None:
    upstream = start_latency_upstream(latency=2, words=3)
    server = start_server(MESSAGING_MODELS_FILE=models_file(tmp_path, upstream))

    texts = asyncio.run(_stream_texts(server.url, key, 150, leave=0))

    assert texts[0] is None
    assert [text for text in texts[1:] if text != " word0 word1 word2"] == []
    assert upstream.stats()["peak"] >= 100, upstream.stats()
    wait_until(lambda: upstream.stats()["disconnects"], what="the request of the client that left to close")
    assert upstream.stats()["disconnects"] == 1, (upstream.stats(), server.log()[-3000:])
    assert MessageJob.objects.filter(status="cancelled").count() == 1
    assert MessageJob.objects.filter(status="completed", attempts=1).count() == 149


def test_a_synchronous_message_keeps_its_lease_while_its_model_is_silent(
    start_server: Callable[..., Server],
    start_cluster: Callable[..., Cluster],
    start_latency_upstream: Callable[..., LatencyUpstream],
    key: str,
    tmp_path: Path,
    models_file: Callable[..., str],
) -> None:
    # Silent for twice the lease, with a worker beside it ready to take over a lost message.
    upstream = start_latency_upstream(latency=2 * LEASE_SECONDS, words=2)
    models = models_file(tmp_path, upstream)
    start_cluster(MESSAGING_MODELS_FILE=models)
    server = start_server(MESSAGING_MODELS_FILE=models)

    texts = asyncio.run(_stream_texts(server.url, key, 1))

    assert texts == [" word0 word1"]
    job = MessageJob.objects.get()
    assert (job.status, job.attempts) == ("completed", 1)
    assert upstream.stats()["requests"] == 1
