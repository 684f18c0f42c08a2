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

# The deltas that carry streamed text, and the field that holds it.
_DELTA_FIELD = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class MessageBuilder:
    """Applies Anthropic-shaped stream events to a message object, as the SDKs do.

    A second `message_start` (a message taken up again after its worker died) starts over.
    Streamed text is kept as a list of pieces and joined when the message is read: adding
    each delta to a growing string would copy it every time (quadratic: a million characters
    in 4-character deltas took 27 s).
    """

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        # (block index, field) -> the pieces streamed so far, for text, thinking and tool input.
        self._pieces: dict[tuple[int, str], list[str]] = {}
        self._stopped: set[int] = set()
        self._ended = False

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.message = copy.deepcopy(event["message"])
            self._pieces = {}
            self._stopped = set()
            self._ended = False
            return
        if self.message is None:
            return
        content = self.message["content"]
        if kind == "content_block_start":
            content.append(copy.deepcopy(event["content_block"]))
        elif kind == "content_block_delta":
            index, delta = event["index"], event["delta"]
            delta_type = delta.get("type")
            field = _DELTA_FIELD.get(delta_type)
            if field is not None:
                self._pieces.setdefault((index, field), []).append(delta[field])
            elif delta_type == "signature_delta":
                content[index]["signature"] = delta["signature"]
            elif delta_type == "citations_delta":
                content[index].setdefault("citations", []).append(delta["citation"])
        elif kind == "content_block_stop":
            self._stopped.add(event["index"])
        elif kind == "message_delta":
            self._ended = True
            self.message.update(event.get("delta") or {})
            usage = event.get("usage") or {}
            self.message.setdefault("usage", {}).update({k: v for k, v in usage.items() if v is not None})

    def result(self) -> dict[str, Any] | None:
        """The message so far; tool inputs still streaming are parsed as far as they go.

        A message cut short (cancelled, timed out) never got the final `message_delta` that
        reports its output usage: its `output_tokens` is estimated from what it produced.
        """
        if self.message is None:
            return None
        message = copy.deepcopy(self.message)
        content = message["content"]
        for (index, field), pieces in self._pieces.items():
            block = content[index]
            if field == "partial_json":
                block["input"] = _tool_input("".join(pieces), finished=index in self._stopped)
            else:
                block[field] = block.get(field, "") + "".join(pieces)
        if not self._ended:
            usage = message.setdefault("usage", {})
            usage["output_tokens"] = max(usage.get("output_tokens") or 0, estimate_output_tokens(content))
        return message


def _tool_input(raw: str, *, finished: bool) -> Any:
    """A tool call's streamed JSON arguments. Unparseable ones are kept as `_unparsed` once the
    block has stopped; before that they are still arriving, and stay `{}` until they parse."""
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"_unparsed": raw} if finished else {}


def estimate_output_tokens(content: list[dict[str, Any]]) -> int:
    """About one token per 4 characters of text, thinking and tool input, like echo's estimate
    of input tokens."""
    chars = 0
    for block in content:
        chars += len(block.get("text") or "") + len(block.get("thinking") or "")
        if "input" in block:
            chars += len(json.dumps(block["input"]))
    return -(-chars // 4)


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
        and event["delta"]["type"] in _DELTA_FIELD
    )


def _is_tool_result(event: dict[str, Any]) -> bool:
    return event["type"] == "content_block_start" and event["content_block"].get("type") == "mcp_tool_result"


class ResultTooLarge(Exception):
    """The model's answer grew past MESSAGING_MAX_RESULT_CHARS characters."""


class EventRecorder:
    """A running message's events on their way to the database.

    The runner adds each event as the model produces it, and its writer takes what is due at
    every flush, for all the process's messages in one transaction (messaging/runner.py).
    `stream: true` records every token delta, taken in batches at most
    MESSAGING_FLUSH_INTERVAL apart. `stream: false` records the start, then deltas merged into
    one per block at most every MESSAGING_CHECK_INTERVAL, and the end: a message cancelled or
    cut short keeps what its model wrote, since a stopped message's result is what its
    recorded events add up to.
    """

    def __init__(self, *, token_deltas: bool):
        self.token_deltas = token_deltas
        self.builder = MessageBuilder()
        self._buffer: list[dict[str, Any]] = []
        self._urgent = False
        self._last_take = time.monotonic()
        self._check_interval = settings.MESSAGING_CHECK_INTERVAL
        self._max_chars = settings.MESSAGING_MAX_RESULT_CHARS
        self._chars = 0

    def add(self, event: dict[str, Any]) -> bool:
        """Keep `event`; True when it should be written at once (the model has started)."""
        if event["type"] == "message_start":
            self._chars = 0  # a retried attempt starts its message over
        elif event["type"] == "content_block_delta":
            field = _DELTA_FIELD.get(event["delta"].get("type"))
            if field is not None:
                self._chars += len(event["delta"][field])
        elif _is_tool_result(event):
            # Tools' answers are part of what the message stores, whole in their start.
            self._chars += len(json.dumps(event["content_block"].get("content") or []))
        # Checked before the event is kept, so what is stored stays within the limit.
        if self._chars > self._max_chars:
            raise ResultTooLarge(
                f"The answer grew past {self._max_chars} characters "
                "(MESSAGING_MAX_RESULT_CHARS); it was stopped there."
            )
        self.builder.apply(event)
        if not self.token_deltas and self._buffer and _mergeable(self._buffer[-1], event):
            previous = self._buffer[-1]
            field = _DELTA_FIELD[event["delta"]["type"]]
            self._buffer[-1] = {**previous, "delta": {**previous["delta"], field: previous["delta"][field] + event["delta"][field]}}
        else:
            self._buffer.append(event)
        if event["type"] == "message_start" or _is_tool_result(event):
            # A client sees at once that the model has started; a tool's result, once written,
            # is never asked for again (messaging/toolloop.py).
            self._urgent = True
        return self._urgent

    def take(self, now: float) -> list[dict[str, Any]]:
        """The events due for writing at monotonic time `now`, removed from the buffer."""
        if not self._buffer:
            return []
        elapsed = now - self._last_take
        # A block's start carries no content and its first delta follows at once: writing it
        # alone would make that first token wait a whole flush interval (bench_ttft: ~60 ms).
        waiting_for_content = self._buffer[-1]["type"] == "content_block_start" and elapsed < self._check_interval
        due = self._urgent or (self.token_deltas and not waiting_for_content) or elapsed >= self._check_interval
        return self.rest() if due else []

    def rest(self) -> list[dict[str, Any]]:
        """Every event not written yet (the message has ended)."""
        events, self._buffer = self._buffer, []
        self._urgent = False
        self._last_take = time.monotonic()
        return events

    def put_back(self, events: list[dict[str, Any]]) -> None:
        """Events whose write failed (the database was away) go out with the next flush."""
        self._buffer[:0] = events
