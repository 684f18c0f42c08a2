"""GET /v1/messages/{message_id}/stream and POST /v1/messages, against a real ASGI server
(uvicorn, as the README serves it) and a real `qcluster`, over real HTTP connections."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from messaging.models import APIKey, MessageJob
from tests.processes import Server, wait_until
from tests.sse import Comment, Event, events_only, read_stream
from tests.upstreams import OpenAIUpstream, Reply, error_reply, openai_upstream, text_stream  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"word{number}" for number in range(1, 41))


class Client:
    """One owner's HTTP client for the server under test."""

    def __init__(self, server: Server, key: str):
        self.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def submit(self, text: str, **fields: Any) -> str:
        response = self.http.post("/v1/messages/async", json={"messages": [{"role": "user", "content": text}], **fields})
        assert response.status_code == 202, response.text
        return str(response.json()["message_id"])

    def state(self, message_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/messages/{message_id}").json())

    def wait_for(self, message_id: str, *statuses: str) -> dict[str, Any]:
        return wait_until(
            lambda: s if (s := self.state(message_id))["status"] in statuses else None,
            what=f"{message_id} to be {' or '.join(statuses)}",
        )

    def stream(self, message_id: str, **kwargs: Any) -> Any:
        return self.http.stream("GET", f"/v1/messages/{message_id}/stream", **kwargs)

    def all_events(self, message_id: str, **kwargs: Any) -> list[Event]:
        with self.stream(message_id, **kwargs) as response:
            assert response.status_code == 200, response.read()
            return list(events_only(read_stream(response)))


@pytest.fixture
def key(transactional_db: None) -> str:
    return APIKey.objects.create_key(name="alice", owner="alice")[1]


@pytest.fixture
def client(start_server: Any, key: str) -> Iterator[Client]:
    client = Client(start_server(), key)
    yield client
    client.http.close()


def assert_numbered(events: list[Event], first: int = 1) -> None:
    assert [e.id for e in events] == list(range(first, first + len(events)))
    assert all(e.data["sequence_number"] == e.id and e.data["type"] == e.event for e in events)


def text_of(events: list[Event]) -> str:
    return "".join(e.data["delta"].get("text", "") for e in events if e.event == "content_block_delta")


class TestStream:
    def test_it_replays_a_finished_message_and_closes_after_its_terminal_status(self, client: Client, start_cluster: Any) -> None:
        start_cluster()
        message_id = client.submit("hello streaming world")
        client.wait_for(message_id, "completed")

        events = client.all_events(message_id)

        assert_numbered(events)
        assert [e.status for e in events if e.status] == ["pending", "processing", "completed"]
        kinds = [e.event for e in events if e.event != "status"]
        assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
        assert events[-1].status == "completed"
        assert text_of(events) == "hello streaming world"
        start = next(e for e in events if e.event == "message_start").data["message"]
        assert set(start) >= {"id", "type", "role", "model", "content", "stop_reason", "usage"}

    def test_it_follows_a_live_message_token_by_token(self, client: Client, start_cluster: Any) -> None:
        message_id = client.submit(LONG_TEXT, model="echo-slow", stream=True)
        start_cluster()

        events = client.all_events(message_id)

        assert_numbered(events)
        assert events[0].status == "pending" and events[-1].status == "completed"
        assert sum(e.event == "content_block_delta" for e in events) == 40
        assert text_of(events) == LONG_TEXT

    @pytest.mark.parametrize("resume", ["last-event-id", "starting_after"])
    def test_a_reconnect_in_the_middle_gets_exactly_the_events_after_it(self, client: Client, start_cluster: Any, resume: str) -> None:
        message_id = client.submit(LONG_TEXT, model="echo-slow", stream=True)
        start_cluster()
        first_part: list[Event] = []
        with client.stream(message_id) as response:
            for event in events_only(read_stream(response)):
                first_part.append(event)
                if event.event == "content_block_delta" and len(first_part) >= 10:
                    break  # drop the connection mid-message
        assert client.state(message_id)["status"] == "processing"
        last = first_part[-1].id
        assert last is not None

        if resume == "last-event-id":
            rest = client.all_events(message_id, headers={"Last-Event-ID": str(last)})
        else:
            rest = client.all_events(message_id, params={"starting_after": last})

        assert_numbered(rest, first=last + 1)
        whole = first_part + rest
        assert_numbered(whole)
        assert whole[-1].status == "completed"
        assert text_of(whole) == LONG_TEXT

    def test_starting_after_the_last_event_of_a_finished_message_returns_nothing(self, client: Client, start_cluster: Any) -> None:
        start_cluster()
        message_id = client.submit("done")
        client.wait_for(message_id, "completed")
        last = client.all_events(message_id)[-1].id

        assert client.all_events(message_id, params={"starting_after": last}) == []

    def test_a_cancellation_is_seen_on_the_stream(self, client: Client, start_cluster: Any) -> None:
        message_id = client.submit(LONG_TEXT, model="echo-slow", stream=True)
        start_cluster()
        seen: list[Event] = []
        with client.stream(message_id) as response:
            for event in events_only(read_stream(response)):
                seen.append(event)
                if event.event == "content_block_delta" and len(seen) == 8:
                    assert client.http.post(f"/v1/messages/{message_id}/cancel").status_code == 200

        assert seen[-1].status == "cancelled"
        assert_numbered(seen)
        assert 0 < sum(e.event == "content_block_delta" for e in seen) < 40

    def test_it_sends_pings_while_nothing_happens(self, start_server: Any, key: str) -> None:
        client = Client(start_server(MESSAGING_PING_INTERVAL="0.2"), key)
        message_id = client.submit("nobody runs me")  # no cluster: it stays pending

        items: list[Event | Comment] = []
        with client.stream(message_id) as response:
            for item in read_stream(response):
                items.append(item)
                if sum(isinstance(i, Comment) for i in items) == 2:
                    break

        assert isinstance(items[0], Event) and items[0].status == "pending"
        assert [i.text for i in items if isinstance(i, Comment)] == ["ping", "ping"]

    @pytest.mark.parametrize("accept", ["text/event-stream", "*/*", "application/json"])
    def test_it_streams_whatever_the_client_accepts(self, client: Client, start_cluster: Any, accept: str) -> None:
        start_cluster()
        message_id = client.submit("accept this")
        client.wait_for(message_id, "completed")

        with client.stream(message_id, headers={"Accept": accept}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "x-request-id" in response.headers
            assert list(events_only(read_stream(response)))[-1].status == "completed"

    def test_an_unknown_or_foreign_message_is_a_json_404_before_any_stream(self, client: Client) -> None:
        bob_key = APIKey.objects.create_key(name="bob", owner="bob")[1]
        bobs = httpx.post(
            f"{client.http.base_url}/v1/messages/async",
            json={"messages": [{"role": "user", "content": "bob's"}]},
            headers={"x-api-key": bob_key},
        ).json()["message_id"]

        for message_id in ("msg_nope", bobs):
            response = client.http.get(f"/v1/messages/{message_id}/stream", headers={"Accept": "text/event-stream"})
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["type"] == "not_found_error"

    def test_it_refuses_a_missing_key_and_a_bad_resume_point(self, client: Client) -> None:
        message_id = client.submit("x")

        assert httpx.get(f"{client.http.base_url}/v1/messages/{message_id}/stream").status_code == 401
        bad = client.http.get(f"/v1/messages/{message_id}/stream", headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 400
        assert bad.json()["error"]["errors"] == ["Last-Event-ID: must be an event sequence number from 0 to 2147483647, not 'abc'"]

    def test_a_resume_point_that_is_not_a_sequence_number_is_a_400_in_either_form(self, client: Client) -> None:
        message_id = client.submit("x")
        # Digits that are not ASCII ("²".isdigit() is True, int("²") fails), numbers past what an
        # event's sequence column holds, and numbers too long for int() at all.
        values = {
            "\u00b2": "'\u00b2'",
            "\u0663": "'\u0663'",  # ARABIC-INDIC DIGIT THREE
            str(2**31): "'2147483648'",
            str(2**63): "'9223372036854775808'",
            "9" * 5000: "'" + "9" * 40 + "…'",
            "-1": "'-1'",
            "1.5": "'1.5'",
            "0x10": "'0x10'",
        }
        for value, shown in values.items():
            by_query = client.http.get(f"/v1/messages/{message_id}/stream", params={"starting_after": value})
            # httpx sends str headers as ASCII: the others go as bytes (UTF-8), as a browser would.
            by_header = client.http.get(f"/v1/messages/{message_id}/stream", headers={"Last-Event-ID": value.encode()})

            sentence = f"starting_after: must be an event sequence number from 0 to 2147483647, not {shown}"
            assert by_query.status_code == 400, (value, by_query.text)
            assert by_query.json()["error"] == {"type": "invalid_request_error", "message": sentence, "errors": [sentence]}
            assert by_header.status_code == 400, (value, by_header.text)
            assert by_header.json()["error"]["type"] == "invalid_request_error"
            assert by_header.json()["error"]["message"].startswith("Last-Event-ID: must be an event sequence number from 0 to 2147483647")

    def test_the_largest_sequence_number_is_a_valid_resume_point(self, client: Client) -> None:
        message_id = client.submit("x")  # no cluster: it stays pending, the stream stays open

        with client.stream(message_id, params={"starting_after": str(2**31 - 1)}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")

    def test_a_message_id_that_cannot_exist_is_a_json_404(self, client: Client) -> None:
        # PostgreSQL refuses a NUL in a query: that was a 500.
        for message_id in ["a\x00b", "\u00b2", "x" * 300, "a b"]:
            response = client.http.get(f"/v1/messages/{quote(message_id, safe='')}/stream")

            assert response.status_code == 404, (message_id, response.text)
            assert response.json()["error"]["type"] == "not_found_error"


class TestSynchronous:
    def test_it_answers_with_the_message_when_not_streaming(self, client: Client) -> None:
        response = client.http.post("/v1/messages", json={"messages": [{"role": "user", "content": "right now"}]})

        assert response.status_code == 200
        result = response.json()
        assert result["type"] == "message" and result["role"] == "assistant"
        assert result["content"] == [{"type": "text", "text": "right now"}]
        assert result["stop_reason"] == "end_turn"
        message_id = response.headers["x-message-id"]
        assert result["id"] == message_id
        # Recorded like any message.
        assert client.state(message_id)["status"] == "completed"
        assert message_id in [m["message_id"] for m in client.http.get("/v1/messages").json()["data"]]

    def test_it_answers_with_the_events_when_streaming(self, client: Client) -> None:
        with client.http.stream("POST", "/v1/messages", json={"messages": [{"role": "user", "content": "a b c"}], "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = list(events_only(read_stream(response)))

        assert_numbered(events)
        assert [e.status for e in events if e.status] == ["pending", "processing", "completed"]
        assert text_of(events) == "a b c"

    def test_it_refuses_an_invalid_request_like_the_other_endpoints(self, client: Client) -> None:
        response = client.http.post("/v1/messages", json={"messages": []})

        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert not MessageJob.objects.exists()

    @pytest.mark.parametrize("stream", [True, False])
    def test_a_client_that_disconnects_cancels_its_message(self, client: Client, stream: bool) -> None:
        body = {"model": "echo-slow", "messages": [{"role": "user", "content": LONG_TEXT}], "stream": stream}
        if stream:
            with client.http.stream("POST", "/v1/messages", json=body) as response:
                message_id = response.headers["x-message-id"]
                for event in events_only(read_stream(response)):
                    if event.event == "content_block_delta":
                        break  # hang up mid-answer
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.http.post("/v1/messages", json=body, timeout=0.8)
            message_id = wait_until(lambda: MessageJob.objects.values_list("message_id", flat=True).first(), what="the message")

        state = client.wait_for(message_id, "cancelled")
        produced = "".join(block.get("text", "") for block in (state["result"] or {}).get("content", []))
        assert produced != LONG_TEXT

    def test_the_message_list_is_still_served_on_the_same_path(self, client: Client) -> None:
        assert client.http.get("/v1/messages").json()["data"] == []

    def test_a_bad_body_is_a_400_that_says_why_and_nothing_runs(self, client: Client) -> None:
        from tests.test_validate import CONTROL_CHARACTERS, NULL_ITEMS

        cases = list(NULL_ITEMS.values())
        for character in CONTROL_CHARACTERS:
            body = {"messages": [{"role": "user", "content": "hi"}], "correlation_id": f"order{character}42"}
            cases.append((body, [f"correlation_id: must not contain control characters (U+{ord(character[0]):04X} at index 5)"]))

        for body, errors in cases:
            response = client.http.post("/v1/messages", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["errors"] == errors
        assert not MessageJob.objects.exists()

    def test_what_the_client_chose_comes_back_in_headers_that_cannot_break(self, client: Client) -> None:
        correlation_id = "été 東京 %41"
        body = {
            # 200 messages from one role: 199 warnings; and unknown fields named with DEL, CJK
            # and 10,000 characters, which the first warning repeats.
            "messages": [{"role": "user", "content": "hi"}] * 200,
            "correlation_id": correlation_id,
            "x\x7fy": 1,
            "東京": 2,
            "z" * 10_000: 3,
        }

        response = client.http.post("/v1/messages", json=body)

        assert response.status_code == 200, response.text
        headers = dict(response.headers.raw)
        assert all(0x20 <= byte < 0x7F for value in headers.values() for byte in value), headers
        assert unquote(headers[b"x-correlation-id"].decode()) == correlation_id
        raw_warnings = headers[b"x-warnings"]
        assert len(raw_warnings) <= 4096
        warnings = json.loads(raw_warnings)
        assert warnings[0].startswith("unknown fields are ignored: x\x7fy, zzz") and warnings[0].endswith("zz…")
        assert warnings[1] == "messages[0] and messages[1] are both from user; consecutive messages of one role are merged by most providers"
        assert warnings[-1].endswith("more warnings: POST /v1/messages/validate lists them all")
        assert client.state(response.headers["x-message-id"])["correlation_id"] == correlation_id


class TestSynchronousFailures:
    """A message that ran and failed: the answer's status and type follow the contract's table
    (messaging.errors.FAILED_MESSAGE_RESPONSES), its sentence names what happened, and the
    message keeps its own error; nothing names the provider's address."""

    # (the upstream's reply, the answer's status and error.type, the message's own error.type)
    CASES = [
        (error_reply(400, "Invalid 'messages': too long."), 400, "invalid_request_error", "invalid_request_error"),
        (error_reply(401, "Incorrect API key provided.", error_type="invalid_api_key"), 500, "api_error", "authentication_error"),
        (error_reply(404, "The model does not exist.", error_type="not_found_error"), 500, "api_error", "not_found_error"),
        (error_reply(429, "Rate limit reached.", error_type="rate_limit_error"), 429, "rate_limit_error", "rate_limit_error"),
        (error_reply(500, "The server had an error.", error_type="server_error"), 500, "api_error", "api_error"),
        (error_reply(529, "Overloaded.", error_type="overloaded_error"), 529, "overloaded_error", "overloaded_error"),
        (Reply(delay=5, stream=text_stream("late")), 500, "api_error", "timeout_error"),
    ]

    def test_the_answer_says_what_failed_with_the_contracts_status(self, start_server: Any, key: str, openai_upstream: OpenAIUpstream, tmp_path: Path) -> None:
        models = tmp_path / "models.toml"
        models.write_text(
            f'[models.gpt-x]\nprovider = "openai"\nbase_url = "{openai_upstream.base_url}"\nmax_tokens = 100\n'
            "max_attempts = 1\nread_timeout = 0.3\n"
        )
        server = start_server(MESSAGING_MODELS_FILE=str(models))
        client = Client(server, key)
        address = openai_upstream.base_url.split("//")[1].split("/")[0]

        for reply, status, error_type, own_type in self.CASES:
            openai_upstream.script(reply)

            response = client.http.post("/v1/messages", json={"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]})

            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["type"] == error_type
            message_id = response.headers["x-message-id"]
            state = client.state(message_id)
            assert state["status"] == "failed" and state["error"]["type"] == own_type
            assert state["error"]["message"].startswith('The openai provider for model "gpt-x" ')
            assert error["message"] == f"Message {message_id} failed ({own_type}): {state['error']['message']}"
            assert error.get("errors") == ([error["message"]] if status == 400 else None)
            assert address not in response.text and address not in json.dumps(state)
            with client.stream(message_id) as stream:
                assert address not in stream.read().decode()
        assert address not in server.log() and "127.0.0.1:" + address.split(":")[1] not in server.log()


class TestAnthropicSDK:
    @pytest.fixture
    def anthropic(self, client: Client, key: str) -> Any:
        import anthropic

        return anthropic.Anthropic(base_url=str(client.http.base_url), api_key=key, max_retries=0)

    def test_messages_create_gets_the_echo(self, anthropic: Any) -> None:
        message = anthropic.messages.create(
            model="echo",
            max_tokens=100,
            system=[{"type": "text", "text": "You are an echo."}],
            messages=[{"role": "user", "content": "Hello from the SDK"}],
            stop_sequences=["never"],
            metadata={"user_id": "u-1"},
        )

        assert message.content[0].text == "Hello from the SDK"
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 4

    def test_messages_stream_gets_the_events_and_the_final_message(self, anthropic: Any) -> None:
        with anthropic.messages.stream(
            model="echo-slow", max_tokens=100, messages=[{"role": "user", "content": "one two three"}]
        ) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()

        assert texts == ["one ", "two ", "three"]
        assert final.content[0].text == "one two three"
        assert final.stop_reason == "end_turn"

    def test_a_forced_tool_call_comes_back_as_tool_use(self, anthropic: Any) -> None:
        message = anthropic.messages.create(
            model="echo",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
            tool_choice={"type": "tool", "name": "get_weather"},
        )

        assert message.stop_reason == "tool_use"
        assert message.content[-1].name == "get_weather"
        assert isinstance(message.content[-1].input["city"], str)


def test_hundreds_of_open_streams_do_not_starve_ordinary_requests(client: Client) -> None:
    """Not a speed test (bench/ measures that): it checks that 200 idle streams hold no thread
    or connection that ordinary requests would wait for."""
    message_id = client.submit("nobody runs me")
    opened = threading.Barrier(201)
    stop = threading.Event()
    failures: list[BaseException] = []

    def hold_stream() -> None:
        try:
            with httpx.Client(base_url=client.http.base_url, headers=client.http.headers, timeout=30) as http:
                with http.stream("GET", f"/v1/messages/{message_id}/stream") as response:
                    assert response.status_code == 200
                    opened.wait()
                    stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            opened.abort()

    threads = [threading.Thread(target=hold_stream) for _ in range(200)]
    for thread in threads:
        thread.start()
    try:
        opened.wait(timeout=60)
        for _ in range(20):
            assert client.http.post("/v1/messages/validate", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
