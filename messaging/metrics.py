"""Prometheus metrics. (Being written: for now only the interface other modules call.)"""

from __future__ import annotations


def rate_limited(kind: str) -> None:
    """A request refused by a rate limit; `kind` is "requests" or "unfinished"."""
