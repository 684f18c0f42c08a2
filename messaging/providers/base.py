"""The small interface every model provider implements.

A provider turns a normalized, validated request into a stream of events shaped exactly like
Anthropic Messages streaming events, whatever the upstream API speaks. Keeping one event shape
means the runner, the stored message and the API output never need to know which provider ran.

Providers are asynchronous: a model call is almost all waiting, so one process keeps hundreds
of them open on one event loop (messaging/runner.py) instead of a thread or a process each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Request fields that tune sampling. A model lists the ones it honours in `supports`; the
# others draw a validation warning naming them, and providers do not send them.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    provider: str
    max_tokens: int
    default_max_tokens: int
    # The SAMPLING_FIELDS this model honours.
    supports: frozenset[str] = frozenset()
    # Excluded from hashing so that specs stay hashable even though a dict is not.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


class ProviderError(Exception):
    """The provider could not complete the message. `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, error_type: str = "api_error", retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.retryable = retryable


class Provider(ABC):
    @abstractmethod
    def stream(self, request: dict, spec: ModelSpec, *, message_id: str) -> AsyncIterator[dict]:
        """An async generator of the model's events, exactly shaped like Anthropic Messages
        streaming events (message_start, content_block_start, content_block_delta,
        content_block_stop, message_delta, message_stop).

        Cancellation is asyncio's: the runner cancels the task iterating this generator (a
        cancelled message, a timeout) or closes it (`aclose()`). Either way the generator must
        stop at its current `await`, even in the middle of a silent upstream, and close its
        upstream request (an `async with` around the response does) so the model stops
        generating. Work that would hold the event loop for long (building a large example
        from a schema) runs in a thread: every other message of the process shares the loop.
        """


def message_start(message_id: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> dict[str, Any]:
    """The `message_start` event of a message that has no content yet."""
    return {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        },
    }
