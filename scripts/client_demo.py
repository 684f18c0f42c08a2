#!/usr/bin/env python3
"""Drive a Python client generated from the service's OpenAPI schema against a running service.

Generate the client, then point this script at it:

    openapi-python-client generate --url http://127.0.0.1:8000/v1/schema --meta none \\
        --output-path /tmp/messaging_api_client
    python scripts/client_demo.py --base-url http://127.0.0.1:8000 --key "$KEY" \\
        --client-dir /tmp/messaging_api_client

It uses every operation the way an integrator would: validate (with both auth headers, and a
body with errors), submit, read until the message ends, list, follow the stream, run one
synchronously, cancel, and ask for a message that does not exist. Each step prints what it
saw; the first answer that differs from the contract stops it with exit status 1. It needs
`echo` and `echo-slow` (built in) and a worker running.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

TERMINAL = {"completed", "failed", "error", "cancelled"}


class Mismatch(Exception):
    """An answer that differs from what the contract says."""


def check(condition: bool, what: str, got: Any) -> None:
    if not condition:
        raise Mismatch(f"{what}; got {got!r}")


def step(text: str) -> None:
    print(f"ok  {text}", flush=True)


def load_package(client_dir: Path) -> ModuleType:
    """The generated package: `client_dir` itself (`--meta none`), or the one package inside it
    (a generated project with its pyproject.toml)."""
    client_dir = client_dir.resolve()
    if (client_dir / "__init__.py").exists():
        package_dir = client_dir
    else:
        found = [path.parent for path in client_dir.glob("*/client.py") if (path.parent / "__init__.py").exists()]
        if len(found) != 1:
            raise SystemExit(f"{client_dir} holds no generated client package (or more than one): {found}")
        package_dir = found[0]
    sys.path.insert(0, str(package_dir.parent))
    return importlib.import_module(package_dir.name)


class Demo:
    def __init__(self, package: ModuleType, base_url: str, key: str, timeout: float):
        self.name = package.__name__
        self.models = importlib.import_module(f"{self.name}.models")
        self.timeout = timeout
        client_class = importlib.import_module(f"{self.name}.client").AuthenticatedClient
        self.bearer = client_class(base_url=base_url, token=key)
        self.api_key = client_class(base_url=base_url, token=key, prefix="", auth_header_name="x-api-key")
        self.wrong_key = client_class(base_url=base_url, token="not-a-key")
        self.correlation_id = f"client-demo-{uuid.uuid4().hex[:12]}"

    def operation(self, tag: str, name: str) -> Any:
        return importlib.import_module(f"{self.name}.api.{tag}.{name}")

    def chat(self, text: str, **fields: Any) -> Any:
        m = self.models
        # Blocks rather than a plain string: the union generators used to drop. (openapi-python-client
        # names a `type` property `type_`.)
        message = m.ChatMessageRequest(role=m.RoleEnum.USER, content=[m.TextBlockRequest(type_=m.TextBlockTypeEnum.TEXT, text=text)])
        return m.ChatRequest(messages=[message], correlation_id=self.correlation_id, **fields)

    def expect(self, response: Any, status: HTTPStatus, model: Any, what: str) -> Any:
        check(response.status_code == status, f"{what}: status {status.value}", (response.status_code, response.content[:500]))
        check(isinstance(response.parsed, model), f"{what}: a {model.__name__}", response.parsed)
        return response.parsed

    def expect_error(self, response: Any, status: HTTPStatus, error_type: str, what: str) -> Any:
        error = self.expect(response, status, self.models.Error, what)
        check(error.error.type_ == error_type, f"{what}: error type {error_type}", error.to_dict())
        return error.error

    def run(self) -> None:
        m = self.models
        models_list = self.operation("models", "models_list")
        validate = self.operation("messages", "messages_validate")
        create_async = self.operation("messages", "messages_create_async")
        get = self.operation("messages", "messages_get")
        list_messages = self.operation("messages", "messages_list")
        stream = self.operation("messages", "messages_stream")
        create = self.operation("messages", "messages_create")
        cancel = self.operation("messages", "messages_cancel")

        listed = self.expect(models_list.sync_detailed(client=self.bearer), HTTPStatus.OK, m.ModelList, "models_list")
        ids = [model.id for model in listed.data]
        check({"echo", "echo-slow"} <= set(ids), "models_list: echo and echo-slow are configured", ids)
        step(f"models_list: {', '.join(ids)}")

        self.expect_error(models_list.sync_detailed(client=self.wrong_key), HTTPStatus.UNAUTHORIZED, "authentication_error", "a wrong key")
        step("a wrong key: 401 authentication_error")

        text = "Hello from a generated client"
        for header, client in (("Authorization: Bearer", self.bearer), ("x-api-key", self.api_key)):
            result = self.expect(validate.sync_detailed(client=client, body=self.chat(text, model="echo")), HTTPStatus.OK, m.ValidationResult, f"messages_validate ({header})")
            check(result.valid and result.errors == [], f"messages_validate ({header}): valid", result.to_dict())
            check(result.request_summary.model == "echo", f"messages_validate ({header}): summary names the model", result.to_dict())
            step(f"messages_validate with {header}: valid, {result.request_summary.estimated_input_tokens} input tokens estimated")

        invalid = self.chat(text, temperature=5.0, max_tokens=0)
        result = self.expect(validate.sync_detailed(client=self.bearer, body=invalid), HTTPStatus.OK, m.ValidationResult, "messages_validate (invalid)")
        check(not result.valid, "messages_validate (invalid): not valid", result.to_dict())
        fields = sorted(error.split(":", 1)[0] for error in result.errors)
        check(fields == ["max_tokens", "temperature"], "messages_validate (invalid): an error for max_tokens and temperature", result.errors)
        step(f"messages_validate with an invalid body: {result.errors}")

        error = self.expect_error(create_async.sync_detailed(client=self.bearer, body=invalid), HTTPStatus.BAD_REQUEST, "invalid_request_error", "messages_create_async (invalid)")
        check(sorted(error.errors) == sorted(result.errors), "messages_create_async (invalid): the errors validate reported", error.to_dict())
        step(f"messages_create_async with an invalid body: 400 with {len(error.errors)} errors")

        accepted = self.expect(create_async.sync_detailed(client=self.bearer, body=self.chat(text, model="echo", priority=7)), HTTPStatus.ACCEPTED, m.Accepted, "messages_create_async")
        check(accepted.status == m.MessageStatusEnum.PENDING, "messages_create_async: pending", accepted.to_dict())
        check(accepted.correlation_id == self.correlation_id, "messages_create_async: the correlation id", accepted.to_dict())
        message_id = accepted.message_id
        step(f"messages_create_async: 202, {message_id} {accepted.status.value}")

        state = self.until_terminal(get, message_id)
        check(state.status == m.MessageStatusEnum.COMPLETED, "messages_get: completed", state.to_dict())
        answer = "".join(block["text"] for block in state.result.content if block["type"] == "text")
        check(answer == text, "messages_get: echo answers with the message", state.result.to_dict())
        check(state.priority == 7 and state.attempts == 1, "messages_get: priority 7, one attempt", state.to_dict())
        step(f"messages_get until terminal: {state.status.value} after {state.attempts} attempt, answer {answer!r}")

        page = self.expect(list_messages.sync_detailed(client=self.bearer, correlation_id=self.correlation_id, status=m.MessageStatusEnum.COMPLETED, limit=10), HTTPStatus.OK, m.MessageList, "messages_list")
        check([item.message_id for item in page.data] == [message_id], "messages_list: the completed message of this run", page.to_dict())
        check(not page.has_more and page.first_id == message_id, "messages_list: one page", page.to_dict())
        step(f"messages_list by correlation id and status: {page.first_id}")

        events = stream.sync_detailed(client=self.bearer, message_id=message_id)
        check(events.status_code == HTTPStatus.OK and isinstance(events.parsed, str), "messages_stream: 200 with the stream as text", (events.status_code, events.parsed))
        statuses = [line.split('"status":"', 1)[1].split('"', 1)[0] for line in events.parsed.splitlines() if line.startswith('data: {"type":"status"')]
        check(statuses == ["pending", "processing", "completed"], "messages_stream: status events pending, processing, completed", events.parsed[:1000])
        step(f"messages_stream: {events.parsed.count('event: ')} events, statuses {' → '.join(statuses)}")

        ran = self.expect(create.sync_detailed(client=self.bearer, body=self.chat("Right now, please", model="echo")), HTTPStatus.OK, m.Result, "messages_create")
        check([block["text"] for block in ran.content] == ["Right now, please"], "messages_create: echo answers with the message", ran.to_dict())
        check(ran.stop_reason == "end_turn", "messages_create: end_turn", ran.to_dict())
        step(f"messages_create (synchronous): {ran.id} {ran.stop_reason}")

        long_text = " ".join(f"word{number}" for number in range(1, 201))
        slow = self.expect(create_async.sync_detailed(client=self.api_key, body=self.chat(long_text, model="echo-slow")), HTTPStatus.ACCEPTED, m.Accepted, "messages_create_async (echo-slow)")
        cancelled = self.expect(cancel.sync_detailed(client=self.api_key, message_id=slow.message_id), HTTPStatus.OK, m.MessageState, "messages_cancel")
        check(cancelled.status == m.MessageStatusEnum.CANCELLED, "messages_cancel: cancelled", cancelled.to_dict())
        # What it produced before the cancel is kept, in the same Result shape.
        kept = self.until_terminal(get, slow.message_id)
        check(kept.status == m.MessageStatusEnum.CANCELLED, "messages_get: still cancelled", kept.to_dict())
        step(f"messages_cancel: {slow.message_id} cancelled, {len(kept.result.content) if kept.result else 0} content blocks kept")

        conflict = self.expect_error(cancel.sync_detailed(client=self.bearer, message_id=message_id), HTTPStatus.CONFLICT, "conflict_error", "messages_cancel (completed)")
        step(f"messages_cancel of a completed message: 409 {conflict.message!r}")

        missing = self.expect_error(get.sync_detailed(client=self.bearer, message_id="msg_no_such_message"), HTTPStatus.NOT_FOUND, "not_found_error", "messages_get (missing)")
        step(f"messages_get of a missing message: 404 {missing.message!r}")

    def until_terminal(self, get: Any, message_id: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.expect(get.sync_detailed(client=self.bearer, message_id=message_id), HTTPStatus.OK, self.models.MessageState, "messages_get")
            if state.status.value in TERMINAL:
                return state
            check(time.monotonic() < deadline, f"messages_get: {message_id} ends within {self.timeout} s (is a worker running?)", state.to_dict())
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an API key")
    parser.add_argument("--client-dir", required=True, type=Path, help="the generated client (openapi-python-client's output path)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a message may take to end (default 60)")
    args = parser.parse_args(argv)

    demo = Demo(load_package(args.client_dir), args.base_url.rstrip("/"), args.key, args.timeout)
    try:
        demo.run()
    except Mismatch as mismatch:
        print(f"MISMATCH  {mismatch}", file=sys.stderr, flush=True)
        return 1
    print("every step answered as the contract says", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
