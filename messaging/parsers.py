from __future__ import annotations

from typing import IO, Any

import orjson
from django.conf import settings
from django.http import HttpRequest
from rest_framework.exceptions import ParseError, UnsupportedMediaType
from rest_framework.parsers import BaseParser

from messaging.errors import RequestTooLarge

TOO_DEEP = "The request body is nested too deeply."


class JSONParser(BaseParser):
    """Strict JSON: no NaN or Infinity, valid UTF-8, bounded nesting, bounded size.

    DRF hands the parser the raw request stream, which skips Django's own
    DATA_UPLOAD_MAX_MEMORY_SIZE check, so the size limit is enforced here.
    """

    media_type = "application/json"

    def parse(self, stream: IO[bytes], media_type: str | None = None, parser_context: Any = None) -> Any:
        return loads(stream.read(settings.MESSAGING_MAX_BODY_BYTES + 1))


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
    return data


def require_json_body(content_type: str | None, length: int) -> None:
    """DRF reads an empty body, or one with no Content-Type, as {}; a client that sent
    nothing, or not JSON, should hear that instead of "messages: is required"."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if length == 0:
        raise ParseError("The request body is empty; send a JSON object.")
    if media_type != "application/json":
        raise UnsupportedMediaType(media_type or "(no Content-Type)")


def read_json_body(request: HttpRequest) -> Any:
    """The JSON body of a plain (non-DRF) view, with the same checks and errors."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    require_json_body(request.content_type, length)
    if length > settings.MESSAGING_MAX_BODY_BYTES:
        raise RequestTooLarge(f"The request body is larger than {settings.MESSAGING_MAX_BODY_BYTES} bytes.")
    return loads(request.body)
