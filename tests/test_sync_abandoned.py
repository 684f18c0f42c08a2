"""POST /v1/messages whose client goes away before its message has even been stored, in-process:
the moment is injected, which a real server can only hit by chance (seen once in CI)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from django.test import AsyncRequestFactory

from messaging import streaming
from messaging.models import APIKey, MessageJob

LONG_TEXT = " ".join(f"word{number}" for number in range(1, 61))


@pytest.mark.django_db(transaction=True)
def test_a_client_that_leaves_while_its_message_is_stored_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _, key = APIKey.objects.create_key(name="alice", owner="alice")
    storing, stored = threading.Event(), threading.Event()
    real_start = streaming._start

    def slow_start(request: Any) -> Any:
        storing.set()
        assert stored.wait(10)
        return real_start(request)

    monkeypatch.setattr(streaming, "_start", slow_start)
    request = AsyncRequestFactory().post(
        "/v1/messages",
        data={"model": "echo-slow", "messages": [{"role": "user", "content": LONG_TEXT}]},
        content_type="application/json",
        headers={"authorization": f"Bearer {key}"},
    )

    async def client_goes_away() -> None:
        answer = asyncio.ensure_future(streaming.create_message(request))
        await asyncio.get_running_loop().run_in_executor(None, storing.wait, 10)
        answer.cancel()  # what Django does to the view when the client disconnects
        stored.set()
        with pytest.raises(asyncio.CancelledError):
            await answer

    asyncio.run(client_goes_away())

    job = MessageJob.objects.get()
    assert job.status == "cancelled"
    assert job.result is None  # it never ran
