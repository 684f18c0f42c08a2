"""Running providers' async streams from plain (synchronous) tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar, cast

from messaging.providers.http import close_clients

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`coroutine` on an event loop of its own, as the runner would, closing the HTTP clients it
    opened there before the loop ends."""

    async def main() -> T:
        try:
            return await coroutine
        finally:
            await close_clients()

    return asyncio.run(main())


async def collect(stream: AsyncIterator[T], into: list[T] | None = None) -> list[T]:
    """Every item of `stream`, appended to `into` as it comes, so that a caller still has the
    items when the stream fails."""
    items: list[T] = [] if into is None else into
    async for item in stream:
        items.append(item)
    return items


async def close_when(stream: AsyncIterator[T], ready: Callable[[list[T]], bool]) -> list[T]:
    """The items `stream` yields until `ready(items)`; then the stream is closed (`aclose()`)."""
    items: list[T] = []
    async for item in stream:
        items.append(item)
        if ready(items):
            break
    await cast(AsyncGenerator[T, None], stream).aclose()
    return items


async def cancel_when(stream: AsyncIterator[T], ready: Callable[[list[T]], bool]) -> tuple[list[T], float]:
    """The items `stream` yields until the task iterating it is cancelled, as soon as
    `ready(items)`, and the seconds it then took to stop."""
    items: list[T] = []
    task = asyncio.create_task(collect(stream, items))
    async with asyncio.timeout(10):
        while not ready(items):
            await asyncio.sleep(0.01)
    cancelled_at = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return items, time.monotonic() - cancelled_at


class CountedSleep:
    """Real waits (a provider's retry waits), counted as they begin."""

    def __init__(self) -> None:
        self.begun = 0

    async def __call__(self, seconds: float) -> None:
        self.begun += 1
        await asyncio.sleep(seconds)
