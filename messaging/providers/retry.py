"""When to try an upstream model API again, and how long to wait first.

Shared by the providers that talk to a remote API. A failure is retried only when another
attempt may succeed (a connection error, a timeout, 429, 500/502/503/504, 529), with
exponential backoff and full jitter (a random wait between 0 and the exponential cap, so that
many workers failing together do not come back together), and never past `max_attempts` nor
past `retry_deadline` seconds after the first attempt started. A `Retry-After` header (seconds
or an HTTP date) replaces the computed wait: the server knows better than our backoff. A wait
that would end past the deadline is not started at all: failing now beats failing later.

The policy only says how long to wait; the caller waits (`await asyncio.sleep`, which a
cancellation cuts short). Time and randomness are injectable so that tests need neither sleep
nor luck.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    deadline: float = 120.0
    base_delay: float = 0.5
    max_delay: float = 8.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RetryPolicy:
        """The policy a model's options configure (`max_attempts`, `retry_deadline`,
        `retry_base_delay`, `retry_max_delay`), with the defaults above for the others."""
        return cls(
            max_attempts=max(1, int(options.get("max_attempts", cls.max_attempts))),
            deadline=float(options.get("retry_deadline", cls.deadline)),
            base_delay=float(options.get("retry_base_delay", cls.base_delay)),
            max_delay=float(options.get("retry_max_delay", cls.max_delay)),
        )

    def backoff(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform between 0 and base * 2^(failures - 1), capped at max_delay."""
        cap = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return cap * rand()


@dataclass
class Attempts:
    """The attempts of one call: `start()` before each, `delay_before_retry()` after a failure
    that may be retried."""

    policy: RetryPolicy
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    count: int = 0
    _started_at: float | None = field(default=None, repr=False)

    def start(self) -> int:
        if self._started_at is None:
            self._started_at = self.clock()
        self.count += 1
        return self.count

    def delay_before_retry(self, retry_after: float | None = None) -> float | None:
        """The seconds to wait before the next attempt, or None when no attempt is left or the
        wait would end past the deadline."""
        if self.count >= self.policy.max_attempts:
            return None
        delay = retry_after if retry_after is not None else self.policy.backoff(self.count, self.rand)
        assert self._started_at is not None, "start() comes first"
        if self.clock() + delay - self._started_at > self.policy.deadline:
            return None
        return delay


def retry_after_seconds(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """A `Retry-After` header as seconds from now: a number of seconds or an HTTP date
    (RFC 9110 section 10.2.3). None when absent or unreadable; a date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # "-0000" parses zone-less; HTTP dates are GMT anyway
            moment = moment.replace(tzinfo=timezone.utc)
        return max(0.0, moment.timestamp() - now())
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
