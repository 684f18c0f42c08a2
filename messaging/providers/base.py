"""The small interface every model provider implements.

A provider turns a normalized, validated request into a stream of events shaped exactly like
Anthropic Messages streaming events, whatever the upstream API speaks. Keeping one event shape
means the worker, the stored message and the API output never need to know which provider ran.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    id: str
    provider: str
    max_tokens: int
    default_max_tokens: int
    # Optional request fields this model honours; the others draw a validation warning.
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
    def stream(
        self, request: dict, spec: ModelSpec, *, message_id: str, cancelled: threading.Event | None = None
    ) -> Generator[dict, None, None]:
        """Yield the model's events, exactly shaped like Anthropic Messages streaming events
        (message_start, content_block_start, content_block_delta, content_block_stop, message_delta,
        message_stop).

        The caller may stop iterating at any time (cancellation): generators must clean up in
        `finally`. `cancelled` is set, from another thread, the moment the message stops being
        this worker's (cancelled, taken over, or out of time): stop at once, even in the middle
        of a silent wait, and close any upstream connection so the model stops generating.
        """
