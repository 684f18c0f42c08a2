"""The built-in deterministic `echo` model.

It answers without a network or randomness, so the whole pipeline (jobs, streaming, storage,
cancellation) can be exercised and tested exactly: it echoes the last user message word by word,
or, when the request forces a tool or asks for JSON, produces an input/document that satisfies
the given JSON Schema.

It shares the event loop with every other message of its process: `echo-slow`'s pauses are
`await`s (a cancellation cuts them short), and an example for a schema, which may take up to a
second of CPU, is built in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import re
from collections.abc import AsyncIterator, Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from messaging import patterns

from .base import ModelSpec, Provider, message_start

try:
    from re import _parser as _regex_parser  # Python 3.11+
except ImportError:  # pragma: no cover - older Pythons only have the deprecated public name
    import sre_parse as _regex_parser  # type: ignore[no-redef]

NOTHING_TO_ECHO = "(nothing to echo)"

_WORD = re.compile(r"\S+\s*")
_JSON_CHUNKS = 4
# A chunk of generated JSON counts as one output token and holds at most this many characters,
# so whatever a schema asks for (minLength, minItems, nesting), the JSON is at most
# max_tokens * _TOKEN_CHARS long; past that it is cut, as a real model's answer would be.
_TOKEN_CHARS = 64
_DEFAULT_LIMIT = 1024 * _TOKEN_CHARS
# The longest string made up for a `pattern` (RE2 caps each repetition at 1000, not their sum).
_PATTERN_EXAMPLE_CHARS = 10_000
# Steps (see messaging.patterns.Budget) for building one instance, beyond one per character:
# anyOf branches tried and checked, $refs followed. About a second at most.
_WORK_STEPS = 100_000
_CHARS_PER_TOKEN = 4
# Without decoding an image its real size is unknown; this is about what a full-size image costs
# on Anthropic, so the estimate errs high rather than low.
_IMAGE_TOKENS = 1600
_MAX_DEPTH = 32


class EchoProvider(Provider):
    async def stream(self, request: dict, spec: ModelSpec, *, message_id: str) -> AsyncIterator[dict]:
        # Nothing to release: closed early, or cancelled mid-pause, it simply stops.
        max_tokens = request["max_tokens"]
        yield message_start(message_id, spec.id, input_tokens=estimate_tokens(request))

        text = _last_user_text(request.get("messages") or [])
        tool = _forced_tool(request)
        response_format = request.get("response_format") or {}
        json_format = None
        if response_format.get("type") == "json_schema":
            json_format = response_format.get("json_schema") or {}

        blocks: list[Iterator[dict]] = []
        used = 0
        thinking = request.get("thinking") or {}
        if thinking.get("type") == "enabled":
            # Like Anthropic, thinking counts towards max_tokens and the output usage.
            limit = min(max_tokens, thinking.get("budget_tokens") or max_tokens)
            words = _words(_reflection(text, tool, json_format))[:limit]
            blocks.append(_thinking_block(0, words))
            used += len(words)

        index = len(blocks)
        remaining = max_tokens - used
        stop_sequence = None
        if remaining <= 0:
            stop_reason = "max_tokens"
        elif tool is not None:
            # The first free-form string of the input is the user's text: a search tool gets the question.
            chunks, complete = await asyncio.to_thread(_json_answer, tool.get("input_schema") or {}, remaining, prefer_text=text, tool_input=True)
            tool_id = _tool_use_id(message_id, len(request.get("messages") or ()), index)
            blocks.append(_tool_use_block(index, tool_id, tool["name"], chunks))
            used += len(chunks)
            stop_reason = "tool_use" if complete else "max_tokens"
        elif json_format is not None:
            chunks, complete = await asyncio.to_thread(_json_answer, json_format.get("schema") or {}, remaining, prefer_text=text)
            blocks.append(_text_block(index, chunks))
            used += len(chunks)
            stop_reason = "end_turn" if complete else "max_tokens"
        else:
            text, stop_sequence = _cut_at_stop_sequence(text, request.get("stop_sequences") or [])
            words = _words(text)
            emitted = words[:remaining]
            blocks.append(_text_block(index, emitted))
            used += len(emitted)
            if len(emitted) < len(words):
                stop_reason, stop_sequence = "max_tokens", None
            else:
                stop_reason = "end_turn" if stop_sequence is None else "stop_sequence"

        delay = float(spec.options.get("delay", 0.0))
        for event in itertools.chain(*blocks):
            if delay and _is_a_piece(event):
                await asyncio.sleep(delay)
            yield event
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": used},
        }
        yield {"type": "message_stop"}


def estimate_tokens(request: dict) -> int:
    """About one token per 4 characters of the request's text, tool calls and tool definitions."""
    chars = 0
    images = 0
    system = request.get("system")
    if isinstance(system, dict):
        chars += len(system.get("prompt") or "")
    elif isinstance(system, str):
        chars += len(system)
    for message in request.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        else:
            block_chars, block_images = _content_size(content or ())
            chars += block_chars
            images += block_images
    for tool in request.get("tools") or ():
        chars += _size(tool)
    return max(1, math.ceil(chars / _CHARS_PER_TOKEN) + images * _IMAGE_TOKENS)


def example_for_schema(schema: dict | bool, *, prefer_text: str | None = None, limit: int = _DEFAULT_LIMIT) -> Any:
    """A deterministic instance that satisfies `schema` (the JSON Schema subset tool schemas use).

    `prefer_text`, when given, becomes the value of the first free-form string in the instance.
    Contradictory or unsupported schemas still get a best-effort value rather than an error.
    Building stops once the instance's compact JSON would pass `limit` characters: the JSON of
    an instance cut short that way is longer than `limit`, and the caller cuts it there.
    """
    return _Example(schema, prefer_text, limit).build(schema, 0)


# --- streaming helpers -----------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        blocks = message.get("content") or []
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        text = "\n".join(block.get("text") or "" for block in blocks if block.get("type") == "text")
        if not text.strip():
            results = [block for block in blocks if block.get("type") == "tool_result"]
            text = "\n".join(_tool_result_text(block.get("content")) for block in results)
        if text.strip():
            return text
        break
    return NOTHING_TO_ECHO


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(block.get("text") or "" for block in content or () if block.get("type") == "text")


def _forced_tool(request: dict) -> dict | None:
    tools = request.get("tools") or []
    if not tools:
        return None
    tool_choice = request.get("tool_choice") or {}
    response_format = request.get("response_format") or {}
    choice = tool_choice.get("type")
    if choice == "tool":
        return _tool_named(tools, tool_choice.get("name"))
    if choice == "any":
        return tools[0]
    if choice != "none" and response_format.get("type") == "tool_call":
        name = response_format.get("name")
        return _tool_named(tools, name) if name else tools[0]
    return None


def _tool_named(tools: list[dict], name: str | None) -> dict | None:
    # Validation guarantees the name exists; if not, echoing text beats failing the message.
    return next((tool for tool in tools if tool.get("name") == name), None)


def _reflection(text: str, tool: dict | None, json_format: dict | None) -> str:
    count = len(_words(text))
    wrote = f"The user wrote {count} {'word' if count == 1 else 'words'};"
    if tool is not None:
        return f"{wrote} I will call the {tool['name']} tool."
    if json_format is not None:
        name = json_format.get("name") or "requested"
        return f"{wrote} I will answer with JSON matching the {name} schema."
    return f"{wrote} I will echo them back."


def _tool_use_id(message_id: str, turn: int, index: int) -> str:
    # The turn too: each round of a tool loop (messaging/toolloop.py) calls echo again for one
    # message, and ids must stay unique across the conversation.
    return "toolu_" + hashlib.sha256(f"{message_id}:{turn}:{index}".encode()).hexdigest()[:24]


def _json_answer(schema: dict | bool, budget: int, *, prefer_text: str | None = None, tool_input: bool = False) -> tuple[list[str], bool]:
    """The JSON of an example for `schema` in at most `budget` chunks, and whether all of it
    fits (see _json_chunks). A tool's input is always an object. Up to a second of CPU: run it
    in a thread, off the event loop every message of the process shares."""
    value = example_for_schema(schema, prefer_text=prefer_text, limit=budget * _TOKEN_CHARS)
    if tool_input and not isinstance(value, dict):
        value = {}
    return _json_chunks(value, budget)


def _json_chunks(value: Any, budget: int) -> tuple[list[str], bool]:
    """`value`'s JSON in at most `budget` chunks (budget >= 1), and whether all of it fits.

    Each chunk counts as one output token and holds at most _TOKEN_CHARS characters; a short
    document comes in up to _JSON_CHUNKS chunks, so it is never cut by a small max_tokens. A
    document longer than `budget` chunks is cut after the last one that fits.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    room = budget * _TOKEN_CHARS
    complete = len(text) <= room
    text = text[:room]
    count = max(min(_JSON_CHUNKS, budget), math.ceil(len(text) / _TOKEN_CHARS))
    size = math.ceil(len(text) / count)
    return [text[start : start + size] for start in range(0, len(text), size)], complete


def _thinking_block(index: int, words: list[str]) -> Iterator[dict]:
    block = {"type": "thinking", "thinking": "", "signature": ""}
    yield {"type": "content_block_start", "index": index, "content_block": block}
    for word in words:
        yield _delta(index, {"type": "thinking_delta", "thinking": word})
    signature = hashlib.sha256("".join(words).encode()).hexdigest()
    yield _delta(index, {"type": "signature_delta", "signature": signature})
    yield {"type": "content_block_stop", "index": index}


def _tool_use_block(index: int, tool_id: str, name: str, chunks: list[str]) -> Iterator[dict]:
    yield {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
    }
    for chunk in chunks:
        yield _delta(index, {"type": "input_json_delta", "partial_json": chunk})
    yield {"type": "content_block_stop", "index": index}


def _cut_at_stop_sequence(text: str, stop_sequences: list[str]) -> tuple[str, str | None]:
    """The text up to the earliest stop sequence in it, and that sequence (as Anthropic does,
    the sequence itself is not part of the answer)."""
    found = [(text.find(sequence), sequence) for sequence in stop_sequences if sequence and sequence in text]
    if not found:
        return text, None
    position, sequence = min(found)
    return text[:position], sequence


def _text_block(index: int, pieces: list[str]) -> Iterator[dict]:
    yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
    for piece in pieces:
        yield _delta(index, {"type": "text_delta", "text": piece})
    yield {"type": "content_block_stop", "index": index}


def _delta(index: int, delta: dict) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _is_a_piece(event: dict) -> bool:
    """A word or chunk of the answer, which `echo-slow` makes wait as a model's tokens would."""
    return event["type"] == "content_block_delta" and event["delta"]["type"] != "signature_delta"


# --- token estimate --------------------------------------------------------------------------


def _content_size(blocks: Any) -> tuple[int, int]:
    """(characters, images) in a list of content blocks."""
    chars = 0
    images = 0
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            chars += len(block.get("text") or "")
        elif kind == "image":
            images += 1
        elif kind == "thinking":
            chars += len(block.get("thinking") or "")
        elif kind == "tool_use":
            chars += len(block.get("name") or "") + _size(block.get("input"))
        elif kind == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                chars += len(inner)
            elif inner:
                inner_chars, inner_images = _content_size(inner)
                chars += inner_chars
                images += inner_images
        else:
            chars += _size(block)
    return chars, images


def _size(value: Any) -> int:
    """Characters in every key and scalar of a JSON-like value; cheaper than json.dumps."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                total += len(str(key))
                stack.append(inner)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None:
            total += len(str(item))
    return total


# --- schema examples -------------------------------------------------------------------------

_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "iri": "https://example.com/",
    "iri-reference": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "json-pointer": "/example",
    "regex": ".*",
}

_OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties")
_ARRAY_KEYWORDS = ("items", "prefixItems", "minItems", "maxItems", "contains", "uniqueItems")
_STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class _Example:
    """Builds one instance within two bounds: `room`, the characters its JSON may still take
    (each value counts a lower bound of its JSON's length), and `work`, the steps building and
    checking candidates may take (a few `$ref`s make a small schema exponentially large).
    Past either, every value still to build is null and loops stop: the caller cuts the JSON."""

    def __init__(self, root: dict | bool, prefer_text: str | None, limit: int):
        self.root = root
        self.text = prefer_text
        self.room = limit
        # Plain values cost about a step per character of JSON, so the room runs out first.
        self.work = patterns.Budget(_WORK_STEPS + limit)
        self.checker = patterns.SchemaChecker(root, self.work)

    @property
    def full(self) -> bool:
        return self.room < 0 or self.work.exhausted

    def take(self, value: Any) -> Any:
        """`value`, counted against the room left."""
        self.room -= max(1, _size(value))
        return value

    def step(self, steps: int) -> bool:
        """Counts work; False once there is none left."""
        try:
            self.work.spend(steps)
        except patterns.Unchecked:
            return False
        return True

    def build(self, schema: Any, depth: int) -> Any:
        if self.full or not self.step(1):
            return None  # the JSON is cut before this value anyway
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return self.take(None)  # `true` accepts anything; `false` and runaway recursion have no good answer
        schema = self.resolve(schema)
        if not self.step(len(schema)):
            return None
        if "const" in schema:
            return self.take(schema["const"])
        if schema.get("enum"):
            return self.take(schema["enum"][0])
        if "default" in schema and self.is_valid(schema["default"], schema):
            return self.take(schema["default"])
        if isinstance(schema.get("allOf"), list):
            merged = {key: value for key, value in schema.items() if key != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part) if isinstance(part, dict) else part
                if not self.step(len(part) + len(part.get("properties") or ()) if isinstance(part, dict) else 1):
                    return None
                merged = _merge(merged, part)
            return self.build(merged, depth + 1)
        for keyword in ("anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list) and schema[keyword]:
                return self.build_choice(schema, keyword, depth)

        kind = _type_of(schema)
        if kind == "object":
            return self.build_object(schema, depth)
        if kind == "array":
            return self.build_array(schema, depth)
        if kind == "string":
            return self.build_string(schema)
        if kind in ("integer", "number"):
            return self.take(_number(schema, integer=kind == "integer"))
        if kind == "boolean":
            return self.take(True)
        return self.take(None)

    def build_choice(self, schema: dict, keyword: str, depth: int) -> Any:
        rest = {key: value for key, value in schema.items() if key != keyword}
        first = None
        for position, branch in enumerate(schema[keyword]):
            if branch is False:
                continue
            text, room = self.text, self.room
            if isinstance(branch, dict):
                branch = self.resolve(branch)
            candidate = self.build(_merge(rest, branch), depth + 1)
            if self.full or self.is_valid(candidate, schema):
                return candidate
            if position == 0:
                first = candidate
            # An abandoned branch must not use up the preferred text, nor room in the JSON.
            self.text, self.room = text, room
        return self.take(first)

    def build_object(self, schema: dict, depth: int) -> dict:
        properties = schema.get("properties") or {}
        result: dict[str, Any] = {}
        self.room -= 2
        for name in schema.get("required") or ():
            if self.full:
                break
            if name not in result:
                result[self.key(name, not result)] = self.build(self.property_schema(schema, name), depth + 1)
        wanted = schema.get("minProperties", 0)
        for name in properties:
            if len(result) >= wanted or self.full:
                break
            if name not in result:
                result[self.key(name, not result)] = self.build(properties[name], depth + 1)
        additional = schema.get("additionalProperties", True)
        number = 0
        while len(result) < wanted and additional is not False and not self.full:
            number += 1
            name = f"key{number}"
            if name not in result:
                result[self.key(name, not result)] = self.build(self.property_schema(schema, name), depth + 1)
        return result

    def key(self, name: str, first: bool) -> str:
        self.room -= len(name) + 3 + (not first)  # ,"name":
        return name

    def property_schema(self, schema: dict, name: str) -> Any:
        properties = schema.get("properties") or {}
        if name in properties:
            return properties[name]
        pattern_properties = schema.get("patternProperties") or {}
        self.step(len(pattern_properties))
        for pattern, sub in pattern_properties.items():
            if _matches(pattern, name):
                return sub
        additional = schema.get("additionalProperties", True)
        return additional if isinstance(additional, dict) else {}

    def build_array(self, schema: dict, depth: int) -> list:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items")
        self.room -= 1
        result = []
        for sub in prefix:
            self.room -= 1  # [ or ,
            result.append(self.build(sub, depth + 1))
        # Only as many items as required: an optional item would recurse forever in tree schemas.
        count = max(schema.get("minItems", 0), len(result))
        if schema.get("maxItems") is not None:
            count = min(count, schema["maxItems"])
        item_schema = items if isinstance(items, dict) else {}
        seen = {patterns.canonical(value) for value in result} if schema.get("uniqueItems") else None
        while len(result) < count and not self.full:
            self.room -= 1
            value = self.build(item_schema, depth + 1)
            if seen is not None:
                if patterns.canonical(value) in seen:
                    value = self.distinct(value, len(result), item_schema, seen)
                seen.add(patterns.canonical(value))
            result.append(value)
        del result[count:]
        contains = schema.get("contains")
        if isinstance(contains, dict) and not any(self.is_valid(value, contains) for value in result):
            result.append(self.build(contains, depth + 1))
        return result

    def distinct(self, value: Any, position: int, item_schema: Any, taken: set[Any]) -> Any:
        """Another valid item than `value`, for uniqueItems; `value` itself if none comes to mind."""
        resolved = self.resolve(item_schema) if isinstance(item_schema, dict) else {}
        candidates: list[Any] = list(resolved.get("enum") or ())
        if isinstance(value, bool):
            candidates.append(not value)
        elif isinstance(value, (int, float)):
            candidates += [value + position, value - position]
        elif isinstance(value, str):
            candidates += [f"{value}{position}", value[:-position] if position < len(value) else ""]
        for candidate in candidates:
            if not self.step(1):
                break
            if patterns.canonical(candidate) not in taken and self.is_valid(candidate, item_schema):
                return candidate
        return value

    def build_string(self, schema: dict) -> str:
        shortest = schema.get("minLength", 0)
        longest = schema.get("maxLength")

        def fits(text: str) -> bool:
            return len(text) >= shortest and (longest is None or len(text) <= longest)

        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            self.step(1 + len(pattern) // 16)
            for candidate in (_string_for_pattern(pattern), "example", "a", "0", ""):
                if candidate is not None and fits(candidate) and _matches(pattern, candidate):
                    return self.take_string(candidate)
        if schema.get("format") in _FORMATS:
            text = _FORMATS[schema["format"]]
        elif self.text is not None:
            text, self.text = self.text, None
        else:
            text = "example"
        # Characters past the room left would be cut from the JSON anyway: never made.
        text = text[: self.room + 1]
        if isinstance(shortest, int) and len(text) < shortest:
            text += "x" * (min(shortest, self.room + 1) - len(text))
        return self.take_string(text if longest is None else text[:longest])

    def take_string(self, text: str) -> str:
        self.room -= len(text) + 2
        return text

    def resolve(self, schema: dict) -> dict:
        """`schema` with its `$ref` (and the refs it leads to) merged in; siblings win."""
        for _ in range(_MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not self.step(1 + len(schema)):
                return schema
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            target = self.lookup(ref)
            schema = _merge(target, rest) if isinstance(target, dict) else rest
        return schema

    def lookup(self, ref: str) -> Any:
        # Only local JSON pointers: remote documents would need a network, anchors are rare.
        if not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
            return {}
        node: Any = self.root
        for part in ref[2:].split("/") if len(ref) > 1 else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def is_valid(self, instance: Any, schema: Any) -> bool:
        try:
            return self.checker.is_valid(instance, schema)
        except Exception:  # a malformed part of the schema: don't vouch for the value
            return False


def _merge(base: dict, extra: Any) -> dict:
    """Both schemas' constraints in one dict, as far as a simple merge can express them."""
    if not isinstance(extra, dict):
        return dict(base)
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            properties = dict(merged[key])
            for name, sub in value.items():
                ours = properties.get(name)
                properties[name] = _merge(ours, sub) if isinstance(ours, dict) and isinstance(sub, dict) else sub
            merged[key] = properties
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        elif key == "type" and key in merged:
            ours = _types(merged[key])
            theirs = _types(value)
            common = [kind for kind in theirs if kind in ours or (kind == "integer" and "number" in ours)]
            merged[key] = common or value
        else:
            merged[key] = value
    return merged


def _types(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def _type_of(schema: dict) -> str | None:
    kinds = _types(schema.get("type"))
    if kinds:
        non_null = [kind for kind in kinds if kind != "null"]
        return non_null[0] if non_null else "null"
    for kind, keywords in (
        ("object", _OBJECT_KEYWORDS),
        ("array", _ARRAY_KEYWORDS),
        ("string", _STRING_KEYWORDS),
        ("number", _NUMBER_KEYWORDS),
    ):
        if any(keyword in schema for keyword in keywords):
            return kind
    return None


def _number(schema: dict, *, integer: bool) -> int | float:
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum", lower=True)
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum", lower=False)
    step = schema.get("multipleOf")

    def fits(value: float) -> bool:
        above = low is None or value > low or (value == low and not low_open)
        below = high is None or value < high or (value == high and not high_open)
        return above and below

    # 0 is the most natural example and a multiple of everything; else the range end nearest 0.
    if fits(0):
        return 0
    if low is not None and low > 0 or (low == 0 and low_open):
        if step:
            value = math.ceil(low / step) * step
            if low_open and value == low:
                value += step
        elif integer:
            value = math.floor(low) + 1 if low_open else math.ceil(low)
        else:
            value = low if not low_open else (low + high) / 2 if high is not None else low + 1
    else:
        assert high is not None  # 0 is outside the range, and not below it
        if step:
            value = math.floor(high / step) * step
            if high_open and value == high:
                value -= step
        elif integer:
            value = math.ceil(high) - 1 if high_open else math.floor(high)
        else:
            value = high if not high_open else (low + high) / 2 if low is not None else high - 1
    if integer or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return value


def _bound(schema: dict, inclusive: str, exclusive: str, *, lower: bool) -> tuple[float | None, bool]:
    """The tighter of the inclusive and exclusive limits, and whether it is exclusive."""
    closed = schema.get(inclusive)
    opened = schema.get(exclusive)
    if isinstance(opened, bool):  # draft 4 spelled exclusiveness as a flag on minimum/maximum
        return closed, opened and closed is not None
    if opened is None:
        return closed, False
    if closed is None:
        return opened, True
    tighter = opened >= closed if lower else opened <= closed
    return (opened, True) if tighter else (closed, False)


def _matches(pattern: str, text: str) -> bool:
    try:
        return patterns.search(pattern, text)
    except patterns.UnsupportedPattern:
        return False


_CATEGORY_CHARS = {
    "CATEGORY_DIGIT": "0",
    "CATEGORY_NOT_DIGIT": "a",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": "a",
    "CATEGORY_WORD": "a",
    "CATEGORY_NOT_WORD": "-",
}
_CATEGORY_REGEX = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}


@lru_cache(maxsize=128)
def _string_for_pattern(pattern: str) -> str | None:
    """A short string matching `pattern`, or None when the pattern uses something unsupported.

    Walks Python's own regex parse tree (parsed only: the pattern is never run by `re`), taking
    the first alternative and the fewest repetitions, at most _PATTERN_EXAMPLE_CHARS long; RE2
    confirms the result. The parser is private API, so any surprise just means "no example" and
    the caller falls back.
    """
    if len(pattern) > patterns.MAX_PATTERN_LENGTH:
        return None
    try:
        text = _emit(_regex_parser.parse(pattern), {})
    except Exception:
        return None
    return text if _matches(pattern, text) else None


def _emit(items: Any, groups: dict[int, str]) -> str:
    out = []
    length = 0
    for op, arg in items:
        if length > _PATTERN_EXAMPLE_CHARS:
            raise ValueError("the shortest match is too long to make up")
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("b" if arg == ord("a") else "a")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_class_char(arg))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            fewest, _most, sub = arg
            piece = _emit(sub, groups) if fewest else ""
            if len(piece) * fewest > _PATTERN_EXAMPLE_CHARS:
                raise ValueError("the shortest match is too long to make up")
            out.append(piece * fewest)
        elif name == "SUBPATTERN":
            group, _add_flags, _del_flags, sub = arg
            text = _emit(sub, groups)
            if group:
                groups[group] = text
            out.append(text)
        elif name == "ATOMIC_GROUP":
            out.append(_emit(arg, groups))
        elif name == "BRANCH":
            out.append(_emit(arg[1][0], groups))
        elif name == "GROUPREF":
            out.append(groups.get(arg, ""))
        elif name in ("AT", "ASSERT", "ASSERT_NOT"):
            continue  # zero-width; the final RE2 check catches anchors we ignored
        else:
            raise ValueError(f"unsupported regex construct {name}")
        length += len(out[-1])
    if length > _PATTERN_EXAMPLE_CHARS:
        raise ValueError("the shortest match is too long to make up")
    return "".join(out)


def _class_char(items: list) -> str:
    if items and str(items[0][0]) == "NEGATE":
        for char in "aA0-_ x~":
            if not any(_class_has(char, op, arg) for op, arg in items[1:]):
                return char
        raise ValueError("no character outside the negated class")
    op, arg = items[0]
    name = str(op)
    if name == "LITERAL":
        return chr(arg)
    if name == "RANGE":
        return chr(arg[0])
    if name == "CATEGORY":
        return _CATEGORY_CHARS[str(arg)]
    raise ValueError(f"unsupported character class item {name}")


def _class_has(char: str, op: Any, arg: Any) -> bool:
    name = str(op)
    if name == "LITERAL":
        return ord(char) == arg
    if name == "RANGE":
        return arg[0] <= ord(char) <= arg[1]
    if name == "CATEGORY":
        return re.fullmatch(_CATEGORY_REGEX[str(arg)], char) is not None
    return True  # unknown item: assume it could contain the character
