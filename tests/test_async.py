"""POST /v1/messages/async: accept, store and queue; idempotency by message_id."""

from __future__ import annotations

import logging
import re

import pytest
from rest_framework.test import APIClient

from messaging import queue, runner
from messaging.models import MessageEvent, MessageJob
from tests.conftest import RUNS_THE_WORKER, VALID_REQUEST

ASYNC = "/v1/messages/async"


def test_it_accepts_a_valid_request_exactly_as_the_contract_shows(alice: APIClient) -> None:
    response = alice.post(ASYNC, VALID_REQUEST, format="json")

    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"message_id", "status", "message"}
    assert body["status"] == "pending"
    assert body["message"] == "Request initiated successfully"
    assert re.fullmatch(r"msg_[0-9A-HJKMNP-TV-Z]{26}", body["message_id"])
    assert response["Location"] == f"/v1/messages/{body['message_id']}"


def test_it_stores_the_normalized_request_and_a_pending_event(alice: APIClient) -> None:
    response = alice.post(ASYNC, {**VALID_REQUEST, "correlation_id": "order-42", "priority": 9}, format="json")

    job = MessageJob.objects.get(message_id=response.json()["message_id"])
    assert (job.owner, job.status, job.model, job.priority, job.correlation_id) == ("alice", "pending", "echo", 9, "order-42")
    assert job.request["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello there, echo"}]}]
    assert job.request["max_tokens"] == 1024
    events = list(job.events.values_list("sequence", "type", "data"))
    assert events == [(1, "status", {"type": "status", "status": "pending", "correlation_id": "order-42"})]
    assert response.json()["correlation_id"] == "order-42"


def test_it_defaults_priority_to_five(alice: APIClient) -> None:
    response = alice.post(ASYNC, {**VALID_REQUEST, "priority": None}, format="json")

    assert MessageJob.objects.get(message_id=response.json()["message_id"]).priority == 5


@RUNS_THE_WORKER
def test_it_runs_the_accepted_message_to_completion(alice: APIClient) -> None:
    message_id = alice.post(ASYNC, VALID_REQUEST, format="json").json()["message_id"]

    assert runner.run_one() == message_id

    state = alice.get(f"/v1/messages/{message_id}").json()
    assert state["status"] == "completed"
    assert state["result"]["content"] == [{"type": "text", "text": "Hello there, echo"}]


def test_it_reports_warnings_with_the_acceptance(alice: APIClient) -> None:
    response = alice.post(ASYNC, {**VALID_REQUEST, "stream": True, "colour": "blue"}, format="json")

    assert response.status_code == 202
    warnings = response.json()["warnings"]
    assert any("unknown fields are ignored: colour" in w for w in warnings)
    assert any("stream: true on /v1/messages/async" in w for w in warnings)


def test_it_refuses_an_invalid_request_and_stores_nothing(alice: APIClient) -> None:
    response = alice.post(ASYNC, {"messages": [{"role": "system", "content": ""}], "top_k": -1}, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["errors"] == [
        'messages[0].role: "system" is not one of user, assistant',
        "messages[0].content: must not be empty",
        "top_k: must be at least 0",
    ]
    assert error["message"] == error["errors"][0]
    assert not MessageJob.objects.exists()


class TestMessageIdIdempotency:
    def test_it_uses_the_given_message_id(self, alice: APIClient) -> None:
        response = alice.post(f"{ASYNC}?message_id=order-42.try:1", VALID_REQUEST, format="json")

        assert response.status_code == 202
        assert response.json()["message_id"] == "order-42.try:1"
        assert response["Location"] == "/v1/messages/order-42.try:1"

    @RUNS_THE_WORKER
    def test_it_answers_a_repeat_with_the_current_status_and_no_second_job(self, alice: APIClient) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0.5}
        reordered = {"temperature": 0.5, "max_tokens": 10, "messages": [{"content": "hi", "role": "user"}]}
        alice.post(f"{ASYNC}?message_id=m1", body, format="json")
        runner.run_one()

        response = alice.post(f"{ASYNC}?message_id=m1", reordered, format="json")

        assert response.status_code == 200
        assert response.json()["message_id"] == "m1"
        assert response.json()["status"] == "completed"
        assert MessageJob.objects.count() == 1

    def test_it_refuses_the_same_message_id_with_a_different_body(self, alice: APIClient) -> None:
        alice.post(f"{ASYNC}?message_id=m1", VALID_REQUEST, format="json")

        response = alice.post(f"{ASYNC}?message_id=m1", {"messages": [{"role": "user", "content": "other"}]}, format="json")

        assert response.status_code == 409
        assert response.json()["error"]["type"] == "conflict_error"
        assert MessageJob.objects.count() == 1

    def test_it_keeps_message_ids_per_owner(self, alice: APIClient, bob: APIClient) -> None:
        alice.post(f"{ASYNC}?message_id=shared", VALID_REQUEST, format="json")

        response = bob.post(f"{ASYNC}?message_id=shared", {"messages": [{"role": "user", "content": "bob's"}]}, format="json")

        assert response.status_code == 202
        assert MessageJob.objects.filter(message_id="shared").count() == 2

    @pytest.mark.parametrize("message_id", ["async", "validate", "-leading-dash", "has space", "x" * 129, "a/b", ""])
    def test_it_refuses_a_malformed_or_reserved_message_id(self, alice: APIClient, message_id: str) -> None:
        response = alice.post(ASYNC, VALID_REQUEST, format="json", QUERY_STRING=f"message_id={message_id}")

        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["errors"][0].startswith("message_id:")
        assert not MessageJob.objects.exists()


class TestSecrets:
    REQUEST = {
        **VALID_REQUEST,
        "tool_context": [{"dsn": "postgres://admin:hunter2@db/prod"}],
        "mcp_servers": [
            {"type": "url", "url": "https://mcp.example.com/sse", "name": "files", "authorization_token": "tok-SECRET-123"}
        ],
    }

    def test_it_keeps_secrets_out_of_the_stored_request(self, alice: APIClient) -> None:
        message_id = alice.post(ASYNC, self.REQUEST, format="json").json()["message_id"]

        job = MessageJob.objects.get(message_id=message_id)
        assert "hunter2" not in str(job.request) and "tok-SECRET-123" not in str(job.request)
        assert job.request["tool_context"] == "[redacted]"
        assert job.request["mcp_servers"][0]["authorization_token"] == "[redacted]"
        assert job.secrets == {"tool_context": [{"dsn": "postgres://admin:hunter2@db/prod"}], "mcp_tokens": {"files": "tok-SECRET-123"}}

    @RUNS_THE_WORKER
    def test_it_keeps_secrets_out_of_logs_events_and_responses(self, alice: APIClient, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        response = alice.post(ASYNC, self.REQUEST, format="json")
        message_id = response.json()["message_id"]
        runner.run_one()
        state = alice.get(f"/v1/messages/{message_id}")

        for text in (caplog.text, response.content.decode(), state.content.decode(),
                     str(list(MessageEvent.objects.values_list("data", flat=True)))):
            assert "hunter2" not in text
            assert "tok-SECRET-123" not in text


class TestUnavailableBroker:
    def test_it_answers_503_and_keeps_nothing_when_the_broker_is_down(self, alice: APIClient, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        class BrokerDown:
            """Every use of the broker fails, as when Redis is unreachable."""

            def __getattr__(self, name: str) -> object:
                raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(queue, "shared_broker", BrokerDown)

        response = alice.post(ASYNC, VALID_REQUEST, format="json")

        assert response.status_code == 503
        assert response.json() == {
            "type": "error",
            "error": {
                "type": "overloaded_error",
                "message": "The service cannot accept requests right now; the request was not accepted.",
            },
        }
        assert not MessageJob.objects.exists()
