"""GET /v1/messages/{message_id}, GET /v1/messages and GET /v1/models."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from messaging import runner
from messaging.models import MessageJob
from tests.conftest import RUNS_THE_WORKER

STATE_FIELDS = {
    "message_id", "status", "model", "priority", "correlation_id", "created_at",
    "started_at", "finished_at", "attempts", "result", "error",
}
# A list item is the state without the result, which can be megabytes.
LIST_ITEM_FIELDS = STATE_FIELDS - {"result"}


def submit(client: APIClient, text: str = "hello", **fields: object) -> str:
    body = {"messages": [{"role": "user", "content": text}], **fields}
    response = client.post("/v1/messages/async", body, format="json")
    assert response.status_code == 202, response.content
    return str(response.json()["message_id"])


class TestGetMessage:
    def test_it_shows_a_pending_message(self, alice: APIClient) -> None:
        message_id = submit(alice, correlation_id="order-42")

        state = alice.get(f"/v1/messages/{message_id}").json()

        assert set(state) == STATE_FIELDS
        assert state["status"] == "pending"
        assert state["correlation_id"] == "order-42"
        assert state["created_at"].endswith("Z")
        assert (state["started_at"], state["finished_at"], state["result"], state["error"], state["attempts"]) == (None, None, None, None, 0)

    @RUNS_THE_WORKER
    def test_it_shows_a_completed_message_with_its_result_and_usage(self, alice: APIClient) -> None:
        message_id = submit(alice, "four words right here")
        runner.run_one()

        state = alice.get(f"/v1/messages/{message_id}").json()

        assert state["status"] == "completed"
        assert state["attempts"] == 1
        assert state["started_at"] is not None and state["finished_at"] is not None
        assert state["result"] == {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": "echo",
            "content": [{"type": "text", "text": "four words right here"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": state["result"]["usage"]["input_tokens"], "output_tokens": 4},
        }

    @RUNS_THE_WORKER
    def test_it_shows_max_tokens_as_the_stop_reason(self, alice: APIClient) -> None:
        message_id = submit(alice, "one two three four five", max_tokens=2)
        runner.run_one()

        result = alice.get(f"/v1/messages/{message_id}").json()["result"]

        assert result["stop_reason"] == "max_tokens"
        assert result["content"][0]["text"].split() == ["one", "two"]

    def test_it_hides_another_owners_message_as_not_found(self, alice: APIClient, bob: APIClient) -> None:
        message_id = submit(alice)

        response = bob.get(f"/v1/messages/{message_id}")

        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"

    def test_it_answers_404_for_an_unknown_message(self, alice: APIClient) -> None:
        response = alice.get("/v1/messages/msg_nope")

        assert response.status_code == 404
        assert response.json() == {"type": "error", "error": {"type": "not_found_error", "message": "No message with message_id 'msg_nope'."}}


class TestListMessages:
    def test_it_lists_the_callers_messages_newest_first(self, alice: APIClient, bob: APIClient) -> None:
        first, second = submit(alice, "a"), submit(alice, "b")
        submit(bob, "not alice's")

        body = alice.get("/v1/messages").json()

        assert [item["message_id"] for item in body["data"]] == [second, first]
        assert set(body["data"][0]) == LIST_ITEM_FIELDS
        assert (body["has_more"], body["first_id"], body["last_id"]) == (False, second, first)

    def test_a_page_stays_small_whatever_the_messages_produced(self, alice: APIClient) -> None:
        big = {"type": "message", "content": [{"type": "text", "text": "x" * 1_000_000}]}
        for index in range(5):
            MessageJob.objects.filter(message_id=submit(alice, f"m{index}")).update(status="completed", result=big)

        response = alice.get("/v1/messages?limit=100")

        assert len(response.json()["data"]) == 5
        assert len(response.content) < 10_000
        one = response.json()["data"][0]["message_id"]
        assert alice.get(f"/v1/messages/{one}").json()["result"] == big

    def test_it_answers_an_empty_page(self, alice: APIClient) -> None:
        assert alice.get("/v1/messages").json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}

    def test_it_pages_forward_and_back(self, alice: APIClient) -> None:
        ids = [submit(alice, f"m{i}") for i in range(5)][::-1]  # newest first

        page1 = alice.get("/v1/messages?limit=2").json()
        page2 = alice.get(f"/v1/messages?limit=2&after_id={page1['last_id']}").json()
        page3 = alice.get(f"/v1/messages?limit=2&after_id={page2['last_id']}").json()
        back = alice.get(f"/v1/messages?limit=2&before_id={page3['first_id']}").json()

        assert [m["message_id"] for m in page1["data"]] == ids[0:2] and page1["has_more"]
        assert [m["message_id"] for m in page2["data"]] == ids[2:4] and page2["has_more"]
        assert [m["message_id"] for m in page3["data"]] == ids[4:5] and not page3["has_more"]
        assert [m["message_id"] for m in back["data"]] == ids[2:4] and back["has_more"]

    def test_it_defaults_to_twenty_and_caps_the_limit_at_one_hundred(self, alice: APIClient) -> None:
        for i in range(21):
            submit(alice, f"m{i}")

        assert len(alice.get("/v1/messages").json()["data"]) == 20
        response = alice.get("/v1/messages?limit=101")
        assert response.status_code == 400
        assert response.json()["error"]["errors"][0].startswith("limit:")

    @RUNS_THE_WORKER
    def test_it_filters_by_status_correlation_id_and_model(self, alice: APIClient) -> None:
        done = submit(alice, "done", correlation_id="c-1")
        runner.run_one()
        waiting = submit(alice, "waiting", correlation_id="c-2", model="echo-slow")

        def ids(query: str) -> list[str]:
            return [m["message_id"] for m in alice.get(f"/v1/messages?{query}").json()["data"]]

        assert ids("status=completed") == [done]
        assert ids("status=pending") == [waiting]
        assert ids("correlation_id=c-2") == [waiting]
        assert ids("model=echo") == [done]
        assert ids("model=echo-slow&status=pending") == [waiting]

    def test_it_filters_by_creation_time(self, alice: APIClient) -> None:
        old, new = submit(alice, "old"), submit(alice, "new")
        MessageJob.objects.filter(message_id=old).update(created_at=timezone.now() - timedelta(days=2))
        yesterday = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

        after = alice.get("/v1/messages", {"created_after": yesterday}).json()["data"]
        before = alice.get("/v1/messages", {"created_before": yesterday}).json()["data"]

        assert [m["message_id"] for m in after] == [new]
        assert [m["message_id"] for m in before] == [old]

    @pytest.mark.parametrize("query", ["status=finished", "limit=0", "created_after=yesterday", "after_id=msg_nope", "after_id=a&before_id=b"])
    def test_it_refuses_bad_parameters(self, alice: APIClient, query: str) -> None:
        response = alice.get(f"/v1/messages?{query}")

        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"

    def test_it_cannot_page_from_another_owners_message(self, alice: APIClient, bob: APIClient) -> None:
        bobs = submit(bob)

        assert alice.get(f"/v1/messages?after_id={bobs}").status_code == 400


def test_it_lists_the_built_in_models(alice: APIClient) -> None:
    body = alice.get("/v1/models").json()

    assert body == {
        "data": [
            {"id": "echo", "provider": "echo", "max_tokens": 8192, "supports": ["seed"]},
            {"id": "echo-slow", "provider": "echo", "max_tokens": 8192, "supports": ["seed"]},
        ]
    }
