"""Request bodies: strict JSON, bounded in size and nesting, read the same way by every view.

A body comes with a Content-Length, or chunked (`Transfer-Encoding: chunked`, no length) as
HTTP clients send a body they stream. Django reads neither alike: under WSGI its request stream
is cut at Content-Length (so a chunked body reads as empty), and under ASGI its handler spools
the whole body to a temporary file, however large, before any view runs. So:

- `read_body` reads every body the same way, never more than MESSAGING_MAX_BODY_BYTES + 1
  bytes: one byte past the limit is enough to answer 413;
- `BodyLimit` (project/asgi.py) stops the ASGI handler's spooling at that same byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import IO, Any

import orjson
from django.conf import settings
from django.http import HttpRequest
from rest_framework.exceptions import ParseError, UnsupportedMediaType
from rest_framework.parsers import BaseParser

from messaging.errors import RequestTooLarge

TOO_DEEP = "The request body is nested too deeply."
EMPTY = "The request body is empty; send a JSON object."
# PostgreSQL's jsonb cannot hold U+0000 ("unsupported Unicode escape sequence"): refused here,
# on every database alike, rather than failing as a 500 once the message is being stored.
HAS_NUL = "The request body contains the character U+0000 (NUL), which this service cannot store."


class JSONParser(BaseParser):
    """DRF's parser for `request.data` (and the schema's media types). The views that take a
    body read it with `read_json_body` instead: DRF reads nothing without a Content-Length."""

    media_type = "application/json"

    def parse(self, stream: IO[bytes], media_type: str | None = None, parser_context: Any = None) -> Any:
        return loads(stream.read(settings.MESSAGING_MAX_BODY_BYTES + 1))


def read_json_body(request: HttpRequest) -> Any:
    """The JSON body of a POST, for DRF's views and the async ones alike.

    DRF reads an empty body, or one with no Content-Type, as {}; a client that sent nothing,
    or not JSON, should hear that instead of "messages: is required".
    """
    body = read_body(request)
    if not body:
        raise ParseError(EMPTY)
    media_type = (request.META.get("CONTENT_TYPE") or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(media_type or "(no Content-Type)")
    return loads(body)


def read_body(request: HttpRequest) -> bytes:
    """The request body, Content-Length or chunked; 413 past MESSAGING_MAX_BODY_BYTES, having
    read at most one byte more."""
    limit = settings.MESSAGING_MAX_BODY_BYTES
    try:
        length: int | None = int(request.META["CONTENT_LENGTH"])
    except (KeyError, ValueError):
        length = None
    if length is not None and length > limit:
        raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
    if length is None and "wsgi.input" in request.META:
        # WSGI without a length: Django's stream reads nothing. A server that de-chunks the body
        # says so with wsgi.input_terminated (gunicorn does); the input then ends with the body.
        # Without it, reading could wait for ever on the connection.
        body = request.META["wsgi.input"].read(limit + 1) if request.META.get("wsgi.input_terminated") else b""
    else:
        body = request.read(limit + 1)
    if len(body) > limit:
        raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
    return body


def loads(body: bytes) -> Any:
    limit = settings.MESSAGING_MAX_BODY_BYTES
    if len(body) > limit:
        raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise ParseError(TOO_DEEP) from None
        raise ParseError(f"The request body is not valid JSON: {exc}.") from None
    # orjson reads up to 1024 levels but writes only 254, and the body is written again
    # (its request_hash, stored JSON): refuse here what would otherwise fail later as a 500.
    # Costs about a microsecond for a typical request.
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise ParseError(TOO_DEEP) from None
    # JSON writes U+0000 only as an escape; the bytes search is cheap, and the walk that tells a
    # real NUL from a quoted backslash ("\\u0000") runs only when it finds one.
    if b"\\u0000" in body and _holds_nul(data):
        raise ParseError(HAS_NUL)
    return data


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: hands Django's ASGI handler at most MESSAGING_MAX_BODY_BYTES + 1 bytes
    of a request body, then says the body ended. The view sees one byte too many and answers
    413 (`read_body`); the handler no longer spools gigabytes to disk first. What the client
    still sends is dropped as it arrives, until the response is sent."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        room = settings.MESSAGING_MAX_BODY_BYTES + 1
        cut = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal room, cut
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                if cut:
                    continue  # Django's handler now only listens for a disconnect
                body = message.get("body", b"")[:room]
                room -= len(body)
                if room == 0 and message.get("more_body", False):
                    cut = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return {**message, "body": body}

        await self.app(scope, bounded_receive, send)
