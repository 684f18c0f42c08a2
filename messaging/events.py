"""Recording a message's events, and rebuilding the message from them.

Events are the record of what a model produced: the result of a message is what its events
add up to, and a client following the stream sees the same events in the same order.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from django.conf import settings

from messaging import jobs


class MessageBuilder:
    """Applies Anthropic-shaped stream events to a message object, as the SDKs do.

    A second `message_start` (a message taken up again after its worker died) starts over.
    """

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self._partial_json: dict[int, str] = {}

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.message = copy.deepcopy(event["message"])
            self._partial_json = {}
            return
        if self.message is None:
            return
        content = self.message["content"]
        if kind == "content_block_start":
            block = copy.deepcopy(event["content_block"])
            if block.get("type") == "tool_use":
                self._partial_json[event["index"]] = ""
            content.append(block)
        elif kind == "content_block_delta":
            block, delta = content[event["index"]], event["delta"]
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                block["text"] = block.get("text", "") + delta["text"]
            elif delta_type == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta["thinking"]
            elif delta_type == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta_type == "input_json_delta":
                self._partial_json[event["index"]] = self._partial_json.get(event["index"], "") + delta["partial_json"]
            elif delta_type == "citations_delta":
                block.setdefault("citations", []).append(delta["citation"])
        elif kind == "content_block_stop":
            self._finish_tool_input(event["index"])
        elif kind == "message_delta":
            self.message.update(event.get("delta") or {})
            usage = event.get("usage") or {}
            self.message.setdefault("usage", {}).update({k: v for k, v in usage.items() if v is not None})

    def _finish_tool_input(self, index: int) -> None:
        if index not in self._partial_json or self.message is None:
            return
        raw = self._partial_json.pop(index)
        try:
            self.message["content"][index]["input"] = json.loads(raw) if raw else {}
        except ValueError:
            self.message["content"][index]["input"] = {"_unparsed": raw}

    def result(self) -> dict[str, Any] | None:
        """The message so far; tool inputs still streaming are parsed as far as they go."""
        if self.message is None:
            return None
        for index in list(self._partial_json):
            raw = self._partial_json[index]
            try:
                self.message["content"][index]["input"] = json.loads(raw) if raw else {}
            except ValueError:
                pass
        return copy.deepcopy(self.message)


def build_result(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    builder = MessageBuilder()
    for event in events:
        builder.apply(event)
    return builder.result()


def _mergeable(previous: dict[str, Any], event: dict[str, Any]) -> bool:
    return (
        previous["type"] == event["type"] == "content_block_delta"
        and previous["index"] == event["index"]
        and previous["delta"]["type"] == event["delta"]["type"]
        and event["delta"]["type"] in ("text_delta", "thinking_delta", "input_json_delta")
    )


_DELTA_FIELD = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class EventRecorder:
    """What a worker writes through while it runs a message.

    Every write is fenced (`jobs.append_events`): once the message is cancelled or taken over
    by another worker, the write fails with `jobs.Superseded` and the worker stops. The same
    write renews the lease, so a live worker's message is never taken over.

    `stream: true` records every token delta, flushed in batches at most
    MESSAGING_FLUSH_INTERVAL apart. `stream: false` records the start and the final message:
    deltas are merged into one per block and written at the end.
    """

    def __init__(self, job_pk: int, attempt: int, *, token_deltas: bool):
        self.job_pk = job_pk
        self.attempt = attempt
        self.token_deltas = token_deltas
        self.builder = MessageBuilder()
        self._buffer: list[dict[str, Any]] = []
        now = time.monotonic()
        self._last_write = now
        self._flush_interval = settings.MESSAGING_FLUSH_INTERVAL
        self._check_interval = settings.MESSAGING_CHECK_INTERVAL

    def add(self, event: dict[str, Any]) -> None:
        self.builder.apply(event)
        if not self.token_deltas and self._buffer and _mergeable(self._buffer[-1], event):
            previous = self._buffer[-1]
            field = _DELTA_FIELD[event["delta"]["type"]]
            self._buffer[-1] = {**previous, "delta": {**previous["delta"], field: previous["delta"][field] + event["delta"][field]}}
        else:
            self._buffer.append(event)
        if event["type"] == "message_start":
            self.flush()  # a client sees at once that the model has started
        else:
            self.tick()

    def tick(self) -> None:
        """Flush when due, and at least every check interval renew the lease and look for a
        cancellation (both done by the fenced write, with or without events)."""
        elapsed = time.monotonic() - self._last_write
        # A block's start carries no content and its first delta follows at once: writing it
        # alone would make that first token wait a whole flush interval (bench_ttft: ~60 ms).
        waiting_for_content = self._buffer and self._buffer[-1]["type"] == "content_block_start"
        if self.token_deltas and self._buffer and elapsed >= self._flush_interval and not waiting_for_content:
            self.flush()
        elif elapsed >= self._check_interval:
            self.flush(heartbeat_only=not self.token_deltas)

    def flush(self, *, heartbeat_only: bool = False) -> None:
        events = [] if heartbeat_only else self._buffer
        jobs.append_events(self.job_pk, self.attempt, events)
        if not heartbeat_only:
            self._buffer = []
        self._last_write = time.monotonic()
