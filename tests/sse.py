"""A small Server-Sent Events reader for tests, over a real HTTP connection (httpx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    id: int | None
    event: str | None
    data: Any

    @property
    def status(self) -> str | None:
        return self.data.get("status") if self.event == "status" else None


@dataclass
class Comment:
    text: str


def read_stream(response: httpx.Response) -> Iterator[Event | Comment]:
    """Events and comments as they arrive, per the SSE spec's line rules (what we emit)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield Event(
                    id=int(fields["id"]) if "id" in fields else None,
                    event=fields.get("event"),
                    data=json.loads(fields["data"]) if "data" in fields else None,
                )
                fields = {}
            continue
        if line.startswith(":"):
            yield Comment(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value


def events_only(items: Iterator[Event | Comment]) -> Iterator[Event]:
    return (item for item in items if isinstance(item, Event))
