from __future__ import annotations

from typing import IO, Any

import orjson
from django.conf import settings
from rest_framework.exceptions import ParseError
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
        limit = settings.MESSAGING_MAX_BODY_BYTES
        body = stream.read(limit + 1)
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
