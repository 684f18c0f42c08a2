"""GET /metrics: who may read it, and that its figures move as messages are accepted, run, fail
and end otherwise: in this process, and across a web server and a worker cluster.

Counters here are compared before and after: this process's metrics directory keeps what every
earlier test counted. The end-to-end test gets a fresh directory for its server and cluster.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from messaging import catalog, jobs, metrics, runner
from messaging.models import APIKey, MessageJob, Status
from tests.conftest import RUNS_THE_WORKER
from tests.processes import Cluster, Server, free_port, wait_until
from tests.test_provider_openai import model as openai_model
from tests.test_worker import Api
from tests.upstreams import OpenAIUpstream, error_reply, openai_upstream, streamed, text_stream  # noqa: F401 (a fixture)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not counted yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(**headers: str) -> Samples:
    response = Client().get("/metrics", **headers)
    assert response.status_code == 200, response.content
    return parse(response.content.decode())


def submit(client: APIClient, text: str, **fields: Any) -> str:
    response = client.post("/v1/messages/async", {"messages": [{"role": "user", "content": text}], **fields}, format="json")
    assert response.status_code == 202, response.json()
    return str(response.json()["message_id"])


def pending_message(priority: int = 5, **fields: Any) -> MessageJob:
    return MessageJob.objects.create(owner="alice", model="echo", priority=priority, request={}, request_hash="-", **fields)


# --- who may read it ----------------------------------------------------------------------------------


def test_it_answers_a_loopback_client_in_prometheus_text_format(db: None) -> None:
    response = Client().get("/metrics")  # the test client's REMOTE_ADDR is 127.0.0.1

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE messaging_messages_pending gauge" in response.content.decode()


def test_without_a_token_it_refuses_any_other_client(db: None) -> None:
    response = Client().get("/metrics", REMOTE_ADDR="203.0.113.7")

    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert "METRICS_TOKEN" in response.json()["error"]["message"]


def test_a_request_a_proxy_passed_on_is_not_a_loopback_one(db: None) -> None:
    response = Client().get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.7")

    assert response.status_code == 403


def test_with_a_token_it_wants_that_bearer_token_from_every_client(db: None, settings: Any, alice: APIClient) -> None:
    settings.METRICS_TOKEN = "scrape-secret-1234"

    unauthenticated = Client().get("/metrics")
    wrong = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret-12345")
    api_key = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {alice.api_key}")  # type: ignore[attr-defined]
    right = Client().get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer scrape-secret-1234")

    assert unauthenticated.status_code == wrong.status_code == api_key.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    assert unauthenticated["WWW-Authenticate"].startswith("Bearer")
    assert right.status_code == 200


def test_it_answers_get_only(db: None) -> None:
    response = Client().post("/metrics")

    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert response.json()["error"]["type"] == "method_not_allowed_error"


def test_it_is_not_part_of_the_api_schema(db: None) -> None:
    from drf_spectacular.generators import SchemaGenerator

    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]

    assert "/metrics" not in paths and "/v1/messages/async" in paths


# --- the queue's gauges, from the database ------------------------------------------------------------


def test_the_queue_gauges_count_pending_messages_by_priority_band_and_in_flight_ones(db: None) -> None:
    for priority in (0, 3, 4, 6, 7, 10):  # each band's bounds
        pending_message(priority)
    waiting_long = pending_message(10)
    MessageJob.objects.filter(pk=waiting_long.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    pending_message(5, status=Status.PROCESSING)
    pending_message(5, status=Status.COMPLETED)

    samples = scrape()

    assert [value(samples, "messaging_messages_pending", priority_band=band) for band in ("low", "normal", "high")] == [2, 2, 3]
    assert 300 <= value(samples, "messaging_oldest_pending_age_seconds", priority_band="high") < 330
    assert 0 <= value(samples, "messaging_oldest_pending_age_seconds", priority_band="low") < 30
    assert value(samples, "messaging_messages_in_flight") == 1


def test_with_nothing_pending_the_gauges_are_zero_not_missing(db: None) -> None:
    samples = scrape()

    for band in ("low", "normal", "high"):
        assert ("messaging_messages_pending", frozenset({("priority_band", band)})) in samples
        assert value(samples, "messaging_oldest_pending_age_seconds", priority_band=band) == 0
    assert ("messaging_messages_in_flight", frozenset()) in samples


# --- counters and histograms, in this process ---------------------------------------------------------


@RUNS_THE_WORKER
def test_counters_and_histograms_move_as_messages_run_and_fail(
    alice: APIClient, openai_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch  # noqa: F811 (a fixture)
) -> None:
    monkeypatch.setitem(catalog.models(), "local-model", openai_model(openai_upstream, api_key_env="", retry_base_delay=0.01, retry_max_delay=0.01))
    # One server error (retried), then a refusal that fails the message.
    openai_upstream.script(error_reply(500, "The server had an error"), error_reply(400, "No."))
    before = scrape()

    submit(alice, "four words right here")
    runner.run_one()
    submit(alice, "hello", model="local-model")
    runner.run_one()
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("messaging_messages_accepted_total", model="echo", source="async") == 1
    assert moved("messaging_messages_accepted_total", model="local-model", source="async") == 1
    assert moved("messaging_messages_finished_total", model="echo", status="completed") == 1
    assert moved("messaging_messages_finished_total", model="local-model", status="failed") == 1
    assert moved("messaging_queue_wait_seconds_count", model="echo") == 1
    assert moved("messaging_time_to_first_token_seconds_count", model="echo") == 1
    assert moved("messaging_time_to_first_token_seconds_count", model="local-model") == 0
    assert moved("messaging_message_duration_seconds_count", model="echo") == 1
    assert moved("messaging_message_duration_seconds_count", model="local-model") == 1
    assert moved("messaging_upstream_attempts_total", provider="openai", model="local-model") == 2
    assert moved("messaging_upstream_errors_total", provider="openai", model="local-model", error_type="api_error") == 1
    assert moved("messaging_upstream_errors_total", provider="openai", model="local-model", error_type="invalid_request_error") == 1


@RUNS_THE_WORKER
def test_every_terminal_status_is_counted_once_it_commits(alice: APIClient) -> None:
    cancelled = submit(alice, "never runs")
    expired = submit(alice, "waits too long")
    MessageJob.objects.filter(message_id=expired).update(created_at=timezone.now() - timedelta(days=2))
    before = scrape()

    jobs.cancel(MessageJob.objects.get(message_id=cancelled))
    jobs.expire_pending()
    jobs.expire_pending()  # nothing left: nothing counted twice
    after = scrape()

    def moved(status: str) -> float:
        return value(after, "messaging_messages_finished_total", model="echo", status=status) - value(
            before, "messaging_messages_finished_total", model="echo", status=status
        )

    assert moved("cancelled") == moved("expired") == 1
    # Neither ran to an end: no duration.
    assert value(after, "messaging_message_duration_seconds_count", model="echo") == value(
        before, "messaging_message_duration_seconds_count", model="echo"
    )


def test_an_end_rolled_back_is_not_counted(db: None, django_capture_on_commit_callbacks: Any) -> None:
    job = pending_message()
    before = scrape()

    with django_capture_on_commit_callbacks(execute=False):
        jobs.cancel(job)  # inside the test's transaction, which is rolled back

    assert value(scrape(), "messaging_messages_finished_total", model="echo", status="cancelled") == value(
        before, "messaging_messages_finished_total", model="echo", status="cancelled"
    )


def test_rate_limited_requests_are_counted_by_kind(db: None) -> None:
    before = scrape()

    metrics.rate_limited("requests")
    metrics.rate_limited("requests")
    metrics.rate_limited("unfinished")
    after = scrape()

    assert value(after, "messaging_rate_limited_requests_total", kind="requests") - value(before, "messaging_rate_limited_requests_total", kind="requests") == 2
    assert value(after, "messaging_rate_limited_requests_total", kind="unfinished") - value(before, "messaging_rate_limited_requests_total", kind="unfinished") == 1


def test_a_dead_process_keeps_its_counts_but_not_its_open_streams(db: None) -> None:
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    dead = _pid_of_a_finished_process()
    metrics.rate_limited("requests")
    mine = metrics.RATE_LIMITED.labels("requests")._value.get()
    gauge = metrics._streams_open()
    gauge.inc()
    before = scrape()
    # The files a process leaves when it dies with a stream open.
    shutil.copy(directory / f"gauge_livesum_{os.getpid()}.db", directory / f"gauge_livesum_{dead}.db")
    shutil.copy(directory / f"counter_{os.getpid()}.db", directory / f"counter_{dead}.db")
    try:
        after = scrape()
    finally:
        gauge.dec()
        (directory / f"counter_{dead}.db").unlink()

    assert value(after, "messaging_streams_open") == value(before, "messaging_streams_open")
    assert not (directory / f"gauge_livesum_{dead}.db").exists()
    assert value(after, "messaging_rate_limited_requests_total", kind="requests") == value(
        before, "messaging_rate_limited_requests_total", kind="requests"
    ) + mine


def _pid_of_a_finished_process() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- across processes -------------------------------------------------------------------------------


def scrape_when(server: Server, ready: Callable[[Samples], bool], what: str) -> Samples:
    """The first scrape of `server` that is `ready`."""

    def attempt() -> Samples | None:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            samples = parse(response.read().decode())
        return samples if ready(samples) else None

    return wait_until(attempt, what=f"a scrape showing {what}")


@pytest.mark.e2e
def test_one_scrape_adds_up_what_the_web_and_the_worker_processes_counted(
    start_server: Callable[..., Server], start_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    # A model whose server refuses every connection: two attempts, then the message fails.
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        f'[models.unreachable]\nprovider = "openai"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
        "max_tokens = 4096\nmax_attempts = 2\nretry_base_delay = 0.01\nretry_max_delay = 0.01\n"
    )
    server = start_server(MESSAGING_MODELS_FILE=str(models_file))
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    api = Api(server.url, key)

    # Accepted by the web process with no worker running: they wait.
    completing = [api.submit("hello there", model="echo") for _ in range(2)]
    failing = api.submit("hello", model="unreachable", priority=9)
    stream, abandoned = (http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(2))
    for connection, message_id in ((stream, completing[0]), (abandoned, failing)):
        connection.request("GET", f"/v1/messages/{message_id}/stream", headers={"Authorization": f"Bearer {key}"})
        assert connection.getresponse().status == 200
    scrape_when(server, lambda samples: value(samples, "messaging_streams_open") == 2, what="two open streams")
    abandoned.close()  # the client goes away
    queued = scrape_when(server, lambda samples: value(samples, "messaging_streams_open") == 1, what="one open stream")

    assert value(queued, "messaging_messages_accepted_total", model="echo", source="async") == 2
    assert value(queued, "messaging_messages_accepted_total", model="unreachable", source="async") == 1
    assert value(queued, "messaging_messages_pending", priority_band="normal") == 2
    assert value(queued, "messaging_messages_pending", priority_band="high") == 1
    assert value(queued, "messaging_oldest_pending_age_seconds", priority_band="normal") > 0

    # Run and failed by the worker process; one more run by the web process itself.
    start_cluster(MESSAGING_MODELS_FILE=str(models_file))
    for message_id, status in [*((message_id, "completed") for message_id in completing), (failing, "failed")]:
        wait_until(lambda: api.message(message_id)["status"] == status, what=f"{message_id} to be {status}")  # noqa: B023
    sync_status, _ = api.call("POST", "/v1/messages", {"model": "echo", "messages": [{"role": "user", "content": "now"}]})
    assert sync_status == 200
    # The stream closed itself after the terminal status.
    done = scrape_when(server, lambda samples: value(samples, "messaging_streams_open") == 0, what="the stream closed")
    stream.close()

    assert value(done, "messaging_messages_accepted_total", model="echo", source="sync") == 1
    assert value(done, "messaging_messages_finished_total", model="echo", status="completed") == 3
    assert value(done, "messaging_messages_finished_total", model="unreachable", status="failed") == 1
    assert value(done, "messaging_queue_wait_seconds_count", model="echo") == 2  # the sync one never queued
    assert value(done, "messaging_queue_wait_seconds_sum", model="echo") > 0
    assert value(done, "messaging_time_to_first_token_seconds_count", model="echo") == 3
    assert value(done, "messaging_message_duration_seconds_count", model="echo") == 3
    assert value(done, "messaging_message_duration_seconds_count", model="unreachable") == 1
    assert value(done, "messaging_upstream_attempts_total", provider="openai", model="unreachable") == 2
    assert value(done, "messaging_upstream_errors_total", provider="openai", model="unreachable", error_type="api_error") == 2
    assert [value(done, "messaging_messages_pending", priority_band=band) for band in ("low", "normal", "high")] == [0, 0, 0]
    assert value(done, "messaging_messages_in_flight") == 0
