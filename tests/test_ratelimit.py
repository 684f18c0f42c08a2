"""Per-key limits: requests per minute (x-ratelimit-* on every answer, 429 past the limit) and a
cap on unfinished messages (where messages are created). Exact under concurrency, across web
processes, on SQLite, PostgreSQL and Redis; the limiter only refuses at the door.

Time is moved, not slept through: `ratelimit.clock` is the edge of the world here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient

from messaging import ratelimit, runner
from messaging.models import APIKey, MessageJob
from tests.conftest import RUNS_THE_WORKER, VALID_REQUEST
from tests.test_auth import ENDPOINTS, call

ASYNC = "/v1/messages/async"
HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(ratelimit, "clock", clock)
    return clock


def client_with(owner: str, **limits: int | None) -> APIClient:
    _, key = APIKey.objects.create_key(name=owner, owner=owner, **limits)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    client.api_key = key  # type: ignore[attr-defined]
    return client


def budget(response: Any) -> tuple[str, str, str]:
    return tuple(response[name] for name in HEADERS)  # type: ignore[return-value]


def assert_429(response: Any, retry_after: str, starts: str) -> None:
    assert response.status_code == 429, response.content
    assert response["Retry-After"] == retry_after
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["message"].startswith(starts), error["message"]


# --- Requests per minute --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the async views read from executor threads
@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_every_answer_to_a_counted_request_carries_the_budget(clock: Clock, method: str, url: str) -> None:
    client = client_with("alice", rate_limit_rpm=100)
    client.get("/v1/models")
    clock.advance(0.5)

    response = call(client, method, url)  # 200, 202 or 404: every answer carries it

    assert budget(response) == ("100", "98", "59.5s"), response.status_code


@pytest.mark.django_db
def test_errors_carry_the_budget_too(clock: Clock) -> None:
    client = client_with("alice", rate_limit_rpm=10)

    invalid = client.post(ASYNC, {"messages": []}, format="json")
    missing = client.get("/v1/messages/msg_nothing_here")

    assert (invalid.status_code, budget(invalid)) == (400, ("10", "9", "1m0s"))
    assert (missing.status_code, budget(missing)) == (404, ("10", "8", "1m0s"))


@pytest.mark.django_db
def test_a_key_without_a_limit_gets_no_headers(alice: APIClient) -> None:
    response = alice.get("/v1/models")

    assert response.status_code == 200
    assert [name for name in HEADERS if response.has_header(name)] == []


@pytest.mark.django_db
def test_past_the_limit_it_is_429_with_retry_after_until_the_window_ends(clock: Clock) -> None:
    client = client_with("alice", rate_limit_rpm=3)
    answers = [client.post(ASYNC, VALID_REQUEST, format="json") for _ in range(3)]
    clock.advance(20.4)

    refused = client.post(ASYNC, VALID_REQUEST, format="json")

    assert [answer.status_code for answer in answers] == [202, 202, 202]
    assert [budget(answer)[1] for answer in answers] == ["2", "1", "0"]
    assert_429(refused, "40", "Rate limit reached: this API key may make 3 requests per minute; try again in 40 s.")
    assert budget(refused) == ("3", "0", "39.6s")
    assert MessageJob.objects.count() == 3  # the refused request stored nothing

    clock.advance(39.5)
    assert_429(client.get("/v1/models"), "1", "Rate limit reached")
    assert budget(client.get("/v1/models"))[2] == "100ms"

    clock.advance(0.1)  # the window has ended: the whole budget is back, in a new window
    again = client.post(ASYNC, VALID_REQUEST, format="json")
    assert (again.status_code, budget(again)) == (202, ("3", "2", "1m0s"))


@pytest.mark.django_db
def test_each_key_has_its_own_budget_and_its_own_limit_wins_over_the_default(clock: Clock, settings: Any) -> None:
    settings.MESSAGING_RATE_LIMIT_RPM = 2
    default = client_with("alice")
    own = client_with("alice", rate_limit_rpm=4)

    defaults = [default.get("/v1/models").status_code for _ in range(3)]
    owns = [own.get("/v1/models").status_code for _ in range(5)]

    assert defaults == [200, 200, 429]
    assert owns == [200, 200, 200, 200, 429]
    assert budget(own.get("/v1/models"))[0] == "4"


@pytest.mark.django_db
def test_a_key_s_limit_of_zero_refuses_every_request(clock: Clock) -> None:
    client = client_with("alice", rate_limit_rpm=0)

    assert_429(client.get("/v1/models"), "60", "Rate limit reached")


@pytest.mark.django_db(transaction=True)
def test_the_synchronous_endpoint_and_streams_count_too(clock: Clock) -> None:
    client = client_with("alice", rate_limit_rpm=3)

    ran = client.post("/v1/messages", VALID_REQUEST, format="json")
    stream_url = f"/v1/messages/{ran['X-Message-ID']}/stream"
    streamed = client.get(stream_url)  # the headers come before the events; none are read
    client.get("/v1/models")
    refused = [client.post("/v1/messages", VALID_REQUEST, format="json"), client.get(stream_url)]

    assert (ran.status_code, budget(ran)) == (200, ("3", "2", "1m0s"))
    assert (streamed.status_code, budget(streamed)) == (200, ("3", "1", "1m0s"))
    for response in refused:
        assert_429(response, "60", "Rate limit reached")
        assert budget(response) == ("3", "0", "1m0s")
    assert MessageJob.objects.count() == 1


def test_the_reset_is_written_as_openai_writes_it() -> None:
    assert [ratelimit.duration(ms) for ms in (1, 450, 1000, 1500, 59_500, 59_999, 60_000)] == [
        "1ms", "450ms", "1s", "1.5s", "59.5s", "59.999s", "1m0s",
    ]


# --- Unfinished messages --------------------------------------------------------------------------


@pytest.mark.django_db
def test_past_the_cap_a_new_message_is_429_and_nothing_is_stored(clock: Clock) -> None:
    client = client_with("alice", max_unfinished=2)
    accepted = [client.post(ASYNC, VALID_REQUEST, format="json").status_code for _ in range(2)]

    refused = client.post(ASYNC, VALID_REQUEST, format="json")

    assert accepted == [202, 202]
    assert_429(refused, "1", "Too many unfinished messages: this API key allows 2 pending or processing messages")
    assert MessageJob.objects.count() == 2
    # Reading, listing and validating are not capped.
    assert client.get("/v1/messages").status_code == 200
    assert client.post("/v1/messages/validate", VALID_REQUEST, format="json").status_code == 200


@RUNS_THE_WORKER
def test_finishing_or_cancelling_a_message_frees_a_slot() -> None:
    client = client_with("alice", max_unfinished=2)
    first, second = (client.post(ASYNC, VALID_REQUEST, format="json").json()["message_id"] for _ in range(2))
    assert client.post(ASYNC, VALID_REQUEST, format="json").status_code == 429

    assert runner.run_one() == first  # completed
    assert client.post(ASYNC, VALID_REQUEST, format="json").status_code == 202
    assert client.post(ASYNC, VALID_REQUEST, format="json").status_code == 429

    assert client.post(f"/v1/messages/{second}/cancel").status_code == 200
    assert client.post(ASYNC, VALID_REQUEST, format="json").status_code == 202


@pytest.mark.django_db
def test_a_repeat_of_an_existing_message_id_answers_as_before_and_does_not_count() -> None:
    client = client_with("alice", max_unfinished=1)
    first = client.post(f"{ASYNC}?message_id=order-1", VALID_REQUEST, format="json")

    repeat = client.post(f"{ASYNC}?message_id=order-1", VALID_REQUEST, format="json")
    other_body = client.post(f"{ASYNC}?message_id=order-1", {"messages": [{"role": "user", "content": "else"}]}, format="json")
    new_id = client.post(f"{ASYNC}?message_id=order-2", VALID_REQUEST, format="json")

    assert (first.status_code, repeat.status_code, other_body.status_code) == (202, 200, 409)
    assert repeat.json()["message"] == "Request already accepted"
    assert new_id.status_code == 429


@pytest.mark.django_db
def test_the_cap_counts_the_owners_messages_and_each_key_has_its_own_cap(settings: Any) -> None:
    settings.MESSAGING_MAX_UNFINISHED = 1
    default = client_with("alice")
    larger = client_with("alice", max_unfinished=3)
    bob = client_with("bob")

    assert default.post(ASYNC, VALID_REQUEST, format="json").status_code == 202
    assert default.post(ASYNC, VALID_REQUEST, format="json").status_code == 429
    # The same owner's messages, under another key's cap: one of its three slots is taken.
    assert [larger.post(ASYNC, VALID_REQUEST, format="json").status_code for _ in range(3)] == [202, 202, 429]
    assert bob.post(ASYNC, VALID_REQUEST, format="json").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_the_synchronous_endpoint_is_capped_too() -> None:
    client = client_with("alice", max_unfinished=1)
    assert client.post(ASYNC, VALID_REQUEST, format="json").status_code == 202

    refused = client.post("/v1/messages", VALID_REQUEST, format="json")

    assert_429(refused, "1", "Too many unfinished messages")
    assert MessageJob.objects.count() == 1


# --- Nothing accepted is dropped ------------------------------------------------------------------


@RUNS_THE_WORKER
def test_every_accepted_message_runs_and_no_refused_one_was_stored(clock: Clock) -> None:
    client = client_with("alice", rate_limit_rpm=12, max_unfinished=3)
    answers = []
    for round_ in range(4):
        answers += [client.post(ASYNC, {"messages": [{"role": "user", "content": f"round {round_}"}]}, format="json") for _ in range(4)]
        runner.run_one()  # a worker takes one message per round

    accepted = [answer.json()["message_id"] for answer in answers if answer.status_code == 202]
    assert sorted({answer.status_code for answer in answers}) == [202, 429]
    assert sorted(MessageJob.objects.values_list("message_id", flat=True)) == sorted(accepted)
    while runner.run_one() != "idle":
        pass
    assert set(MessageJob.objects.values_list("status", flat=True)) == {"completed"}


# --- Exact under concurrency, across processes (e2e) ----------------------------------------------

CONCURRENT = 50
LIMIT = 20


def _submit_at_once(urls: list[str], key: str) -> list[httpx.Response]:
    """CONCURRENT submissions released together, spread over the servers at `urls`."""
    start = threading.Barrier(CONCURRENT)

    def submit(index: int) -> httpx.Response:
        with httpx.Client(base_url=urls[index % len(urls)], headers={"x-api-key": key}, timeout=60) as http:
            http.get("/healthz")  # connected before the barrier
            start.wait()
            return http.post(ASYNC, json=VALID_REQUEST)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(submit, range(CONCURRENT)))


@pytest.mark.e2e
@pytest.mark.parametrize("limit", ["rate_limit_rpm", "max_unfinished"])
def test_concurrent_submissions_through_two_servers_are_limited_exactly(start_server: Callable[..., Any], limit: str) -> None:
    servers = [start_server(), start_server()]
    _, key = APIKey.objects.create_key(name="alice", owner="alice", **{limit: LIMIT})

    answers = _submit_at_once([server.url for server in servers], key)

    statuses = [answer.status_code for answer in answers]
    assert (statuses.count(202), statuses.count(429)) == (LIMIT, CONCURRENT - LIMIT), statuses
    assert MessageJob.objects.filter(owner="alice").count() == LIMIT
    refused = [answer for answer in answers if answer.status_code == 429]
    assert {answer.json()["error"]["type"] for answer in refused} == {"rate_limit_error"}
    assert all(answer.headers["Retry-After"].isdigit() for answer in refused)
    if limit == "rate_limit_rpm":
        # Each request was counted once, in some order: the budgets left are 19 … 0, then 0s.
        remaining = sorted(int(answer.headers["x-ratelimit-remaining-requests"]) for answer in answers if answer.status_code == 202)
        assert remaining == list(range(LIMIT))


# --- The admin ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_staff_set_a_key_s_limits_in_the_admin(clock: Clock, admin_client: Any) -> None:
    client = client_with("alice")
    api_key = APIKey.objects.get(owner="alice")

    page = admin_client.get(f"/admin/messaging/apikey/{api_key.pk}/change/").content.decode()
    admin_client.post(f"/admin/messaging/apikey/{api_key.pk}/change/", {"name": "alice", "rate_limit_rpm": "1", "max_unfinished": "5"})

    assert 'name="rate_limit_rpm"' in page and 'name="max_unfinished"' in page
    assert (APIKey.objects.get(pk=api_key.pk).rate_limit_rpm, APIKey.objects.get(pk=api_key.pk).max_unfinished) == (1, 5)
    assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 429]  # at once: no cache


# --- The schema -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_schema_documents_429_and_the_headers_on_every_operation_that_needs_a_key() -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = [(path, method, operation) for path, ops in schema["paths"].items() for method, operation in ops.items()]

    assert len(operations) == 8
    for path, method, operation in operations:
        responses = operation["responses"]
        assert "Retry-After" in responses["429"]["headers"], (path, method)
        assert "RateLimitRequests" in responses["429"]["content"]["application/json"]["examples"], (path, method)
        for status, response in responses.items():
            documented = set(response.get("headers", {}))
            assert documented >= (set() if status == "401" else set(HEADERS)), (path, method, status)
    creating = [(path, method) for path, method, operation in operations if "RateLimitUnfinished" in operation["responses"]["429"]["content"]["application/json"]["examples"]]
    assert sorted(creating) == [("/v1/messages", "post"), ("/v1/messages/async", "post")]
