"""What the service puts in an HTTP header, to a client or to a model provider.

A header value is printable ASCII. A CR or LF would end the header (Django refuses to send it,
so the response becomes a 500 after the work is done), and servers refuse the other control
characters (uvicorn raises on them). So a value a client chose is encoded, never trusted:
text is percent-encoded outside printable ASCII (`urllib.parse.unquote` gives it back), and
JSON is written with every non-ASCII character escaped.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

# Printable ASCII except "%", which is encoded so that the encoding can be undone.
_KEPT = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")

# C0, DEL, C1, and the Unicode line and paragraph separators (JavaScript and some log viewers
# break lines there): never part of an identifier a client chooses, such as a correlation_id.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Proxies and clients limit a response's headers (nginx's proxy buffer: 4-8 KB; httpx: 64 KB
# per line) and warnings can echo what a client sent (unknown field names), so X-Warnings is cut
# to fit well inside; POST /v1/messages/validate still lists every warning in its body.
WARNINGS_HEADER_BYTES = 4096
_WARNING_CHARACTERS = 300


def header_value(text: str) -> str:
    """`text` as a header value: unchanged when it is printable ASCII without "%"."""
    return quote(text, safe=_KEPT)


def warnings_header(warnings: list[str]) -> str:
    """X-Warnings: a JSON array of ASCII text, at most WARNINGS_HEADER_BYTES long."""
    shown: list[str] = []
    room = WARNINGS_HEADER_BYTES - 200  # kept for the last item, which says what was left out
    for index, warning in enumerate(warnings):
        if len(warning) > _WARNING_CHARACTERS:
            warning = warning[: _WARNING_CHARACTERS - 1] + "…"
        room -= len(json.dumps(warning)) + 2  # its ", " separator
        if room < 0:
            left = len(warnings) - index
            shown.append(f"{left} more {'warning' if left == 1 else 'warnings'}: POST /v1/messages/validate lists them all")
            break
        shown.append(warning)
    return json.dumps(shown)  # ensure_ascii: \uXXXX for everything outside printable ASCII
