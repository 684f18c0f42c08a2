"""Server-Sent Events: following a message's events, and the synchronous POST /v1/messages.

These are async Django views (DRF has no async views): under ASGI an idle stream waits on an
asyncio Event and holds no database connection. (Django's ASGI handler does give every request,
so every open stream, an idle thread of its own for the request's lifetime: ~70-100 KB each,
8,000 streams measured on one machine; see bench/README.md.) They share the DRF views'
authentication, body checks, request contract and error renderer.

Every database step runs on the event loop's shared executor (`in_executor`), never with
`sync_to_async`'s thread-sensitive default: under ASGI that gives each request its own thread
and database connection for as long as the request lives, which for a stream is for ever
(200 idle streams exhausted PostgreSQL's connections).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions

from messaging import jobs, metrics, ratelimit, runner
from messaging.auth import APIKeyAuthentication, Owner
from messaging.errors import Conflict, InvalidRequest, error_body, error_response, failed_message
from messaging.headers import header_value, warnings_header
from messaging.models import TERMINAL_STATUSES, MessageEvent, MessageJob, Status
from messaging.notify import hub, in_executor
from messaging.parsers import read_json_body
from messaging.serializers import MESSAGE_ID, check_request

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and other proxies buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}
# Events read from the database per query while replaying.
BATCH = 500
# An event's sequence number is a PositiveIntegerField: 32 bits on PostgreSQL. No event lies
# past it, and a larger number in a query overflows the column's type.
MAX_SEQUENCE = 2**31 - 1
# ASCII digits only: str.isdigit() also takes "²", which int() refuses.
_SEQUENCE = re.compile(r"[0-9]{1,10}")


def _frame(sequence: int, kind: str, data: dict[str, Any]) -> bytes:
    payload = orjson.dumps({**data, "sequence_number": sequence})
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (sequence, kind.encode(), payload)


PING = b": ping\n\n"
# Anthropic's own keep-alive, for its SDKs (which read every event that has data).
ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def _read_events(job_pk: int, after: int) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    """Events after `after` (a batch), or none and the message's status."""
    rows = _events_after(job_pk, after)
    if rows:
        return rows, None
    status = _status(job_pk)
    if status in TERMINAL_STATUSES:
        # The message may have ended between the two reads. Its last events were committed with
        # its terminal status, so they are visible now: without this read a stream would close
        # without them (seen on PostgreSQL under load).
        rows = _events_after(job_pk, after)
    return rows, status


def _events_after(job_pk: int, after: int) -> list[tuple[int, str, dict[str, Any]]]:
    return list(
        MessageEvent.objects.filter(job_id=job_pk, sequence__gt=after)
        .order_by("sequence")
        .values_list("sequence", "type", "data")[:BATCH]
    )


def _status(job_pk: int) -> str | None:
    return MessageJob.objects.filter(pk=job_pk).values_list("status", flat=True).first()


read_events = in_executor(_read_events)


async def follow(job_pk: int, after: int, *, anthropic: bool = False) -> AsyncIterator[bytes]:
    """The message's events after `after`, then live ones, ending with its terminal status.

    `anthropic=True` speaks exactly Anthropic's protocol for its SDKs: no `status` events
    (the SDK refuses any event before `message_start`) and `event: ping` keep-alives.
    """
    async with hub.watch(job_pk) as woken, metrics.stream_open():
        while True:
            woken.clear()
            rows, status = await read_events(job_pk, after)
            for sequence, kind, data in rows:
                after = sequence
                is_status = kind == "status"
                if not (anthropic and is_status):
                    yield _frame(sequence, kind, data)
                if is_status and data["status"] in TERMINAL_STATUSES:
                    return
            if len(rows) == BATCH:
                continue
            if not rows and (status is None or status in TERMINAL_STATUSES):
                return  # finished before `after`, or deleted
            # Only a wake-up means new events; a quiet interval sends a ping and keeps waiting,
            # without reading again (the hub wakes every stream after a listener reconnects).
            while True:
                try:
                    await asyncio.wait_for(woken.wait(), timeout=settings.MESSAGING_PING_INTERVAL)
                    break
                except TimeoutError:
                    yield ANTHROPIC_PING if anthropic else PING


# --- Shared request handling ---------------------------------------------------------------


def _authenticate(request: HttpRequest) -> Owner:
    """The caller, its request counted against its key's rate (RateLimited past it)."""
    authenticated = APIKeyAuthentication().authenticate(request)  # type: ignore[arg-type]
    if authenticated is None:
        raise exceptions.NotAuthenticated()
    owner, key_prefix = authenticated
    request.user = owner  # type: ignore[assignment]  # as DRF does: the access line's owner
    ratelimit.count_request(request, owner, key_prefix)
    return owner


def _find(owner: str, message_id: str) -> int:
    job_pk = None
    # Only ids that could have been given out are looked up (PostgreSQL refuses a NUL in a query).
    if MESSAGE_ID.fullmatch(message_id):
        job_pk = MessageJob.objects.filter(owner=owner, message_id=message_id).values_list("pk", flat=True).first()
    if job_pk is None:
        raise exceptions.NotFound(f"No message with message_id {message_id!r}.")
    return job_pk


def _resume_point(request: HttpRequest) -> int:
    """Last-Event-ID (a reconnecting EventSource) wins over ?starting_after=."""
    header = request.headers.get("Last-Event-ID")
    source, raw = ("Last-Event-ID", header) if header else ("starting_after", request.GET.get("starting_after") or "0")
    if _SEQUENCE.fullmatch(raw) and int(raw) <= MAX_SEQUENCE:
        return int(raw)
    shown = raw if len(raw) <= 40 else raw[:40] + "…"
    raise InvalidRequest([f"{source}: must be an event sequence number from 0 to {MAX_SEQUENCE}, not {shown!r}"])


def _open_stream(request: HttpRequest, message_id: str) -> tuple[int, int]:
    owner = _authenticate(request)
    after = _resume_point(request)
    return _find(owner.name, message_id), after


def _method_not_allowed(request: HttpRequest, allowed: str, where: str) -> HttpResponse:
    response = error_response(exceptions.MethodNotAllowed(request.method), where=where)
    response["Allow"] = allowed
    return response


# --- GET /v1/messages/{message_id}/stream ------------------------------------------------------


STREAM_METHODS = "GET, OPTIONS"


# No cookie authenticates the API: Django's CSRF check would answer a POST with an HTML 403.
@csrf_exempt
async def message_stream(request: HttpRequest, message_id: str) -> HttpResponseBase:
    if request.method == "OPTIONS":
        return HttpResponse(headers={"Allow": STREAM_METHODS})
    if request.method != "GET":
        return _method_not_allowed(request, STREAM_METHODS, "message_stream")
    try:
        job_pk, after = await in_executor(_open_stream)(request, message_id)
    except Exception as exc:
        return ratelimit.add_headers(request, error_response(exc, where="message_stream"))
    stream = StreamingHttpResponse(follow(job_pk, after), content_type="text/event-stream", headers=SSE_HEADERS)
    return ratelimit.add_headers(request, stream)


# --- POST /v1/messages --------------------------------------------------------------------------


def _start(request: HttpRequest) -> tuple[MessageJob, dict[str, Any]]:
    owner = _authenticate(request)
    data = read_json_body(request)
    checked = check_request(data, endpoint="sync")
    if not checked.valid:
        raise InvalidRequest(checked.errors)
    job = jobs.accept_and_claim(owner.name, checked, max_unfinished=owner.max_unfinished)
    return job, {"warnings": checked.warnings, "stream": bool(checked.values.get("stream"))}


def _cancel_abandoned(job_pk: int) -> None:
    job = MessageJob.objects.get(pk=job_pk)
    try:
        jobs.cancel(job)
        logger.info("message %s cancelled: its synchronous client went away", job.message_id)
    except Conflict:
        return  # it finished first
    runner.web_runner().stop_soon(job_pk)  # its upstream request closes now, not at the next check


def _ending(job_pk: int) -> MessageJob:
    return MessageJob.objects.get(pk=job_pk)


async def _until_finished(job_pk: int) -> MessageJob:
    async with hub.watch(job_pk) as woken:
        while True:
            woken.clear()
            job = await in_executor(_ending)(job_pk)
            if job.status in TERMINAL_STATUSES:
                return job
            try:
                await asyncio.wait_for(woken.wait(), timeout=settings.MESSAGING_PING_INTERVAL)
            except TimeoutError:
                pass


async def _stream_then_cancel_if_abandoned(job_pk: int, *, anthropic: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for frame in follow(job_pk, 0, anthropic=anthropic):
            yield frame
        finished = True
    finally:
        if not finished:
            # The client went away (Django cancels the response task): so does its message.
            await in_executor(_cancel_abandoned)(job_pk)


async def _cancel_once_started(start: asyncio.Future[tuple[MessageJob, dict[str, Any]]]) -> None:
    try:
        job, _ = await start
    except Exception:
        return  # refused (invalid, unauthenticated...): nothing was stored
    await in_executor(_cancel_abandoned)(job.pk)


def _finished_response(job: MessageJob, headers: dict[str, str]) -> HttpResponse:
    if job.status == Status.COMPLETED:
        return HttpResponse(orjson.dumps(job.result), content_type="application/json", headers=headers)
    if job.status == Status.CANCELLED:
        body = error_body("conflict_error", f"Message {job.message_id} was cancelled before it finished.")
        return HttpResponse(orjson.dumps(body), status=409, content_type="application/json", headers=headers)
    http_status, body = failed_message(job.message_id, job.status, job.error)
    return HttpResponse(orjson.dumps(body), status=http_status, content_type="application/json", headers=headers)


async def create_message(request: HttpRequest) -> HttpResponseBase:
    start = asyncio.ensure_future(in_executor(_start)(request))
    try:
        job, facts = await asyncio.shield(start)
    except asyncio.CancelledError:
        # The client went away while its message was being stored (a slow first request, a
        # loaded machine): the storing goes on in its thread regardless, and would leave a
        # claimed message that nobody runs until its lease ran out. Cancel it once stored.
        await _cancel_once_started(start)
        raise
    except Exception as exc:
        return error_response(exc, where="create_message")
    # Run here rather than wait in the queue behind asynchronous work: on this process's
    # runner, beside hundreds of others, its lease kept like a worker's.
    runner.web_runner().run(job)

    # The message has run by the time these headers are sent: a value that cannot be a header
    # would turn its answer into a 500, and a retrying client would run it twice.
    headers = {"X-Message-ID": job.message_id}
    if job.correlation_id is not None:
        headers["X-Correlation-ID"] = header_value(job.correlation_id)
    if facts["warnings"]:
        headers["X-Warnings"] = warnings_header(facts["warnings"])
    anthropic = "anthropic-version" in request.headers

    if facts["stream"]:
        return StreamingHttpResponse(
            _stream_then_cancel_if_abandoned(job.pk, anthropic=anthropic),
            content_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )
    try:
        finished = await _until_finished(job.pk)
    except asyncio.CancelledError:
        await in_executor(_cancel_abandoned)(job.pk)
        raise
    return _finished_response(finished, headers)


# --- /v1/messages: GET lists (DRF), POST runs synchronously --------------------------------------


@cache
def _list_view() -> Any:
    from messaging.views import MessageListView

    return sync_to_async(MessageListView.as_view())


# The list view's Allow header (OPTIONS, 405) knows only its own methods.
MESSAGES_ROOT_METHODS = "GET, HEAD, POST, OPTIONS"


@csrf_exempt
async def messages_root(request: HttpRequest) -> HttpResponseBase:
    if request.method == "POST":
        return ratelimit.add_headers(request, await create_message(request))
    response: HttpResponseBase = await _list_view()(request)
    if response.has_header("Allow"):
        response["Allow"] = MESSAGES_ROOT_METHODS
    return response
