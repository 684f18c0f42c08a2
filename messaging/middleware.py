"""Every request's id (X-Request-ID) and access line, and what every log record carries.

Each request logs one access line (`messaging.access`: owner, method, path, status,
duration_ms); each message logs its life (accepted, claimed, each upstream attempt, finished)
with `extra=log_fields(job, event=...)`. Every record gets the request's id, and while a
runner runs a message (`message_context`), the message's ids and its submitting request's, so
one correlation_id or request_id finds a request across the web, the worker and the provider.
LOG_FORMAT=json (settings) writes each record as one JSON object, extras included; the plain
format shows the ids after the message.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Union

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase
from django.utils.encoding import escape_uri_path
from django.utils.functional import LazyObject

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The ids of the message a runner task is running (message_id, correlation_id).
message_var: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("message", default=None)

access_logger = logging.getLogger("messaging.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

Handler = Callable[[HttpRequest], Union[HttpResponseBase, Awaitable[HttpResponseBase]]]


def _request_id(request: HttpRequest) -> str:
    incoming = request.META.get("HTTP_X_REQUEST_ID", "")  # request.headers would copy them all
    if _SAFE_REQUEST_ID.match(incoming):
        return incoming
    return f"req_{uuid.uuid4().hex}"


class RequestIDMiddleware:
    """Every response carries X-Request-ID (the caller's, when it sent a sane one), and every
    request logs one access line; records logged meanwhile carry the id too."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Handler):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if iscoroutinefunction(self):
            return self.__acall__(request)
        started = time.monotonic()
        request.request_id = request_id = _request_id(request)  # type: ignore[attr-defined]
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request_id  # type: ignore[index]
        return _logged(request, response, started)  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.monotonic()
        request.request_id = request_id = _request_id(request)  # type: ignore[attr-defined]
        token = request_id_var.set(request_id)
        try:
            response = await self.get_response(request)  # type: ignore[misc]
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request_id
        return _logged(request, response, started)


# --- the access line ---------------------------------------------------------------------------


def _logged(request: HttpRequest, response: HttpResponseBase, started: float) -> HttpResponseBase:
    """Log the request's access line now or, for a stream, when it ends (its duration is the
    stream's). File responses are logged at once: a WSGI server may send their file itself."""
    if not getattr(response, "is_async", False):
        _log_access(request, response.status_code, started)
        return response

    async def then_log(content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        # Also when the client goes away: the cancellation passes through here.
        try:
            async for part in content:
                yield part
        finally:
            _log_access(request, response.status_code, started)

    response.streaming_content = then_log(response.streaming_content)  # type: ignore[attr-defined]
    return response


def _log_access(request: HttpRequest, status: int, started: float) -> None:
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    owner = _owner(request)
    # The path percent-encoded as it came (no control characters in a plain line), without the
    # query string: ids and filters, never a key, but nothing an operator needs per request.
    path = escape_uri_path(request.path)
    access_logger.info(
        "%s %s %s %.1f ms owner=%s", request.method, path, status, duration_ms, owner,
        extra={
            "event": "request", "request_id": getattr(request, "request_id", "-"), "owner": owner,
            "method": request.method, "path": path, "status": status, "duration_ms": duration_ms,
        },
    )


def _owner(request: HttpRequest) -> str:
    """The owner of the API key that authenticated the request (DRF, and the async views, set
    it as the request's `user`), or "-". The admin's session user, a lazy object, is not read:
    that would be a query, on every request."""
    user = vars(request).get("user")
    name = None if isinstance(user, LazyObject) else getattr(user, "name", None)
    return name if isinstance(name, str) else "-"


# --- what every record carries ----------------------------------------------------------------


def log_fields(job: Any, **fields: Any) -> dict[str, Any]:
    """`extra=` for a line about a message: its ids and its submitting request's, and `fields`
    (`event`: accepted, claimed, finished...)."""
    return {
        "message_id": job.message_id,
        "correlation_id": job.correlation_id,
        "request_id": job.request_id or "-",
        **fields,
    }


def message_context(job: Any) -> contextvars.Context:
    """A context to run `job` in: whatever is logged inside (provider retries, MCP servers,
    failures) names the message and the request that submitted it."""
    context = contextvars.Context()
    context.run(_enter_message, job)
    return context


def _enter_message(job: Any) -> None:
    request_id_var.set(job.request_id or "-")
    message_var.set({"message_id": job.message_id, "correlation_id": job.correlation_id})


class RequestIDLogFilter(logging.Filter):
    """Every record carries `request_id` and, inside a running message, its ids; a value given
    with `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        fields.setdefault("request_id", request_id_var.get())
        for name, value in (message_var.get() or {}).items():
            fields.setdefault(name, value)
        return True


# Shown after a plain line's message when the record has them.
_PLAIN_FIELDS = ("message_id", "correlation_id")
_BARE_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")


class PlainLogFormatter(logging.Formatter):
    """The plain format, with a message's ids after the text: `message_id=msg_… correlation_id=…`
    (a value with spaces or quotes in JSON quotes)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        shown = [
            f"{name}={value if _BARE_VALUE.match(value) else json.dumps(value)}"
            for name in _PLAIN_FIELDS
            if isinstance(value := getattr(record, name, None), str)
        ]
        return f"{text} {' '.join(shown)}" if shown else text
