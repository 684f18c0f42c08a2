"""The request contract (API.md section 2) as DRF serializers, and the response shapes.

`check_request()` is the one entry point every endpoint that takes a chat request uses. It
reports every error at once with its JSON path, the warnings, and the request summary.

Speed: DRF deep-copies a serializer's declared fields on every instantiation (about 0.7 ms for
this nested contract). The request serializers hold no per-call state when driven through
`run_validation`, so `check_request()` builds them once per process and reuses them.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import SplitResult, urlsplit

import orjson
from django.conf import settings
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail, ValidationError
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import RegexValidator
from rest_framework.fields import empty, get_error_detail
from rest_framework.validators import ProhibitSurrogateCharactersValidator

from messaging import catalog, outbound, patterns
from messaging.errors import flatten_errors
from messaging.headers import CONTROL_CHARACTERS
from messaging.models import MessageJob, Status
from messaging.providers.echo import estimate_tokens

REDACTED = "[redacted]"
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Each is connected to for every run of the message: a bound on what one request sets off.
MAX_MCP_SERVERS = 20
MESSAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
RESERVED_MESSAGE_IDS = frozenset({"async", "validate"})
INT64 = (-(2**63), 2**63 - 1)


# --- Strict JSON scalars ----------------------------------------------------------------------
# DRF coerces ("5" -> 5, 1 -> "1", "true" -> True). A JSON API should not: a client that sends
# a string for a number has a bug we should tell it about.


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


class PlainMessages:
    """DRF's stock sentences ("This field is required.") read oddly after a JSON path; errors
    read `messages[0].content: is required`, like the contract's examples."""

    default_error_messages = {
        "required": "is required",
        "null": "must not be null",
        "blank": "must not be empty",
        "empty": "must not be empty",
    }


class StrictCharField(PlainMessages, serializers.CharField):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Our JSON parser (orjson) already refuses lone surrogates; DRF's check walks every
        # character in Python (~2.4 ms per 100k characters).
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitSurrogateCharactersValidator)]

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid_type", kind=_type_name(data))
        return super().to_internal_value(data)

    default_error_messages = {
        "invalid_type": "must be a string, not {kind}",
        "max_length": "must be at most {max_length} characters",
        "min_length": "must be at least {min_length} characters",
    }


class StrictListField(PlainMessages, serializers.ListField):
    default_error_messages = {"not_a_list": "must be an array, not {kind}"}

    def to_internal_value(self, data: Any) -> list[Any]:
        if not isinstance(data, list):
            self.fail("not_a_list", kind=_type_name(data))
        return super().to_internal_value(data)


class StrictBooleanField(PlainMessages, serializers.BooleanField):
    default_error_messages = {"invalid": "must be true or false"}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictIntegerField(PlainMessages, serializers.IntegerField):
    default_error_messages = {
        "invalid": "must be an integer",
        "not_exact": "must be a 64-bit integer",
        "max_value": "must be at most {max_value}",
        "min_value": "must be at least {min_value}",
    }

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            if not isinstance(data, float) or not data.is_integer():
                self.fail("invalid")
            # The parser reads an integer literal beyond the 64-bit range as a float, rounded:
            # -9223372036854775809 would arrive as exactly -2**63 and pass the seed's bounds.
            if abs(data) > 2**53:
                self.fail("not_exact")
            data = int(data)
        self.run_validators(data)  # min/max validators
        return data


class StrictFloatField(PlainMessages, serializers.FloatField):
    default_error_messages = {
        "invalid": "must be a number",
        "not_finite": "must be a finite number",
        "max_value": "must be at most {max_value}",
        "min_value": "must be at least {min_value}",
        "not_above": "must be above {limit}",
    }

    def __init__(self, *, above: float | None = None, **kwargs: Any):
        self.above = above
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        if not math.isfinite(data):
            self.fail("not_finite")
        if self.above is not None and not data > self.above:
            self.fail("not_above", limit=self.above)
        return float(data)


ROLE_CHOICES = ["user", "assistant"]


class StrictChoiceField(PlainMessages, serializers.ChoiceField):
    default_error_messages = {"invalid_choice": '"{input}" is not one of {choices}'}

    def to_internal_value(self, data: Any) -> Any:
        if data == "" and self.allow_blank:
            return ""
        try:
            return self.choice_strings_to_values[data] if isinstance(data, str) else self._fail(data)
        except KeyError:
            self._fail(data)

    def _fail(self, data: Any) -> Any:
        self.fail("invalid_choice", input=data, choices=", ".join(str(c) for c in self.choices))


def _depth(value: Any, limit: int) -> bool:
    """True when `value` nests deeper than `limit` levels."""
    if limit < 0:
        return True
    if isinstance(value, dict):
        return any(_depth(item, limit - 1) for item in value.values())
    if isinstance(value, list):
        return any(_depth(item, limit - 1) for item in value)
    return False


class FreeJSONField(PlainMessages, serializers.JSONField):
    """Any JSON value the client owns (tool inputs, schemas, tool_context), nesting bounded."""

    default_error_messages = {
        "too_deep": "is nested more than {limit} levels deep",
        "not_object": "must be an object, not {kind}",
    }

    def __init__(self, *, object_only: bool = False, **kwargs: Any):
        self.object_only = object_only
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if self.object_only and not isinstance(data, dict):
            self.fail("not_object", kind=_type_name(data))
        if _depth(data, settings.MESSAGING_MAX_JSON_DEPTH):
            self.fail("too_deep", limit=settings.MESSAGING_MAX_JSON_DEPTH)
        return data


class ListSerializer(PlainMessages, serializers.ListSerializer):
    default_error_messages = {"not_a_list": "must be an array, not {kind}", "max_length": "must have at most {max_length} items"}

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, list):
            raise ValidationError({"non_field_errors": [self.error_messages["not_a_list"].format(kind=_type_name(data))]})
        return super().to_internal_value(data)


class Serializer(PlainMessages, serializers.Serializer):
    """Refuses a non-object with a sentence rather than DRF's Python type names."""

    default_error_messages = {"invalid": "must be an object, not {datatype}", "null": "must be an object, not null"}

    class Meta:
        list_serializer_class = ListSerializer

    def to_internal_value(self, data: Any) -> Any:
        """DRF's loop, leaner: one chat request runs it a dozen times (messages, blocks, tools),
        and DRF's generic version re-derives per call what `_plan` derives once."""
        if not isinstance(data, dict):
            raise ValidationError({"non_field_errors": [self.error_messages["invalid"].format(datatype=_type_name(data))]})
        values: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for name, field_, validate_method in self._plan:
            primitive = data.get(name, empty)
            if primitive is empty and not field_.required and field_.default is empty:
                continue  # what DRF's SkipField would do, without raising
            try:
                value = field_.run_validation(primitive)
                if validate_method is not None:
                    value = validate_method(value)
            except ValidationError as exc:
                errors[name] = exc.detail
            except DjangoValidationError as exc:
                errors[name] = get_error_detail(exc)
            except serializers.SkipField:
                continue
            else:
                values[name] = value
        if errors:
            raise ValidationError(errors)
        return values

    @cached_property
    def _plan(self) -> list[tuple[str, serializers.Field, Any]]:
        # No field here renames its source, so the field name is the key in and out.
        return [
            (name, field_, getattr(self, f"validate_{name}", None))
            for name, field_ in self.fields.items()
            if not field_.read_only
        ]

    def run_validators(self, value: Any) -> None:
        if self.validators:  # none of ours declares any; DRF would still rebuild its defaults
            super().run_validators(value)


# --- Content blocks ---------------------------------------------------------------------------


class TextBlockSerializer(Serializer):
    type = serializers.ChoiceField(choices=["text"])
    text = StrictCharField(trim_whitespace=False)


def _http_url(text: str) -> SplitResult | None:
    """The parts of an http(s) URL with a host; None for anything else, unparseable included
    (urlsplit raises on "http://[::1", which must be a validation error, not a crash)."""
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    return parts if parts.scheme in ("http", "https") and host else None


class ImageSourceSerializer(Serializer):
    IMAGE_TYPES = ["image/jpeg", "image/png", "image/gif", "image/webp"]

    type = StrictChoiceField(choices=["base64", "url"])
    media_type = StrictChoiceField(choices=IMAGE_TYPES, required=False)
    data = StrictCharField(required=False)
    url = StrictCharField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        errors: dict[str, list[str]] = {}
        if attrs["type"] == "base64":
            for name in ("media_type", "data"):
                if name not in attrs:
                    errors[name] = ["is required for a base64 image"]
            if "data" in attrs and not _is_base64(attrs["data"]):
                errors["data"] = ["is not base64"]
        else:
            url = attrs.get("url")
            if url is None:
                errors["url"] = ["is required for a url image"]
            elif _http_url(url) is None:
                errors["url"] = ["must be an http(s) URL"]
        if errors:
            raise ValidationError(errors)
        return attrs


def _is_base64(data: str) -> bool:
    """Base64 with whitespace anywhere, checked in linear time. (A regular expression with
    `\\s` inside and after the alphabet backtracked quadratically: a 20 KB field took 12.6 s.)"""
    try:
        binascii.a2b_base64("".join(data.split()), strict_mode=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        return False
    return True


class ImageBlockSerializer(Serializer):
    type = serializers.ChoiceField(choices=["image"])
    source = ImageSourceSerializer()


class ToolUseBlockSerializer(Serializer):
    type = serializers.ChoiceField(choices=["tool_use"])
    id = StrictCharField(max_length=256)
    name = StrictCharField(max_length=64)
    input = FreeJSONField(object_only=True)


# OpenAPI: messaging.schema.ToolResultContentFieldSchema (a string or an array of named block components).
class ToolResultContentField(PlainMessages, serializers.Field):
    default_error_messages = {"invalid": "must be a string or an array of text and image blocks"}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        return _validate_blocks(data, ("text", "image"))

    def to_representation(self, value: Any) -> Any:
        return value


class ToolResultBlockSerializer(Serializer):
    type = serializers.ChoiceField(choices=["tool_result"])
    tool_use_id = StrictCharField(max_length=256)
    content = ToolResultContentField(required=False)
    is_error = StrictBooleanField(required=False)


class ThinkingBlockSerializer(Serializer):
    type = serializers.ChoiceField(choices=["thinking"])
    thinking = StrictCharField(trim_whitespace=False, allow_blank=True)
    signature = StrictCharField(required=False, allow_blank=True)


class MCPToolUseBlockSerializer(Serializer):
    """A call the service made to an MCP tool (in an assistant message sent back)."""

    type = serializers.ChoiceField(choices=["mcp_tool_use"])
    id = StrictCharField(max_length=256)
    name = StrictCharField(max_length=64)
    server_name = StrictCharField(max_length=128)
    input = FreeJSONField(object_only=True)


class MCPToolResultBlockSerializer(Serializer):
    """An MCP tool's answer (in an assistant message sent back)."""

    type = serializers.ChoiceField(choices=["mcp_tool_result"])
    tool_use_id = StrictCharField(max_length=256)
    content = ToolResultContentField(required=False)
    is_error = StrictBooleanField(required=False)


BLOCK_SERIALIZERS: dict[str, Serializer] = {
    "text": TextBlockSerializer(),
    "image": ImageBlockSerializer(),
    "tool_use": ToolUseBlockSerializer(),
    "tool_result": ToolResultBlockSerializer(),
    "thinking": ThinkingBlockSerializer(),
    "mcp_tool_use": MCPToolUseBlockSerializer(),
    "mcp_tool_result": MCPToolResultBlockSerializer(),
}


def _validate_blocks(data: list[Any], allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each block checked by the serializer its `type` names; errors keyed by index."""
    blocks, errors = [], {}
    for index, item in enumerate(data):
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(item, dict):
            errors[index] = [f"must be an object, not {_type_name(item)}"]
        elif "type" not in item:
            errors[index] = {"type": ["is required"]}
        elif kind not in allowed:
            errors[index] = {"type": [f'"{kind}" is not one of {", ".join(allowed)}']}
        else:
            try:
                blocks.append(BLOCK_SERIALIZERS[kind].run_validation(item))
            except ValidationError as exc:
                errors[index] = exc.detail
    if errors:
        raise ValidationError(errors)
    return blocks


CONTENT_BLOCK_TYPES = tuple(BLOCK_SERIALIZERS)


# OpenAPI: messaging.schema.ContentFieldSchema (a string or an array of named block components).
class ContentField(PlainMessages, serializers.Field):
    """A string (a single text block) or a non-empty array of blocks; always stored as blocks."""

    default_error_messages = {
        "invalid": "must be a string or an array of content blocks, not {kind}",
        "empty": "must not be empty",
    }

    def to_internal_value(self, data: Any) -> list[dict[str, Any]]:
        if isinstance(data, str):
            if not data.strip():
                self.fail("empty")
            return [{"type": "text", "text": data}]
        if not isinstance(data, list):
            self.fail("invalid", kind=_type_name(data))
        if not data:
            self.fail("empty")
        return _validate_blocks(data, CONTENT_BLOCK_TYPES)

    def to_representation(self, value: Any) -> Any:
        return value


class MessageSerializer(Serializer):
    role = StrictChoiceField(choices=ROLE_CHOICES)
    content = ContentField()


# --- Tools, MCP, formats ------------------------------------------------------------------------


class ToolSerializer(Serializer):
    name = StrictCharField(help_text="Matches ^[a-zA-Z0-9_-]{1,64}$; unique within `tools`.")
    description = StrictCharField(required=False, allow_blank=True)
    input_schema = FreeJSONField(object_only=True, help_text="A JSON Schema of type object.")

    def validate_name(self, value: str) -> str:
        if not TOOL_NAME.match(value):
            raise ValidationError("must match ^[a-zA-Z0-9_-]{1,64}$")
        return value

    def validate_input_schema(self, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json_schema(value, require_object=True)


# Digest of a schema's canonical JSON -> its problem or None. Keyed by digest because a schema
# can be megabytes; emptied when full, which is rare and costs only re-checks.
_SCHEMA_VERDICTS: dict[bytes, str | None] = {}
_SCHEMA_VERDICTS_SIZE = 1024


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """Checking a schema against the metaschema costs ~0.4 ms; clients send the same tool
    definitions with every turn of a conversation, so the verdicts are cached."""
    digest = hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).digest()
    if digest in _SCHEMA_VERDICTS:
        return _SCHEMA_VERDICTS[digest]
    problem = patterns.schema_problem(schema)
    if len(_SCHEMA_VERDICTS) >= _SCHEMA_VERDICTS_SIZE:
        _SCHEMA_VERDICTS.clear()
    _SCHEMA_VERDICTS[digest] = problem
    return problem


def _check_json_schema(schema: dict[str, Any], *, require_object: bool) -> dict[str, Any]:
    problem = _schema_problem(schema)
    if problem:
        raise ValidationError(problem)
    if require_object and schema.get("type") != "object":
        raise ValidationError('must be a JSON Schema with "type": "object"')
    return schema


class ToolChoiceSerializer(Serializer):
    type = StrictChoiceField(choices=["auto", "any", "tool", "none"])
    name = StrictCharField(required=False)
    disable_parallel_tool_use = StrictBooleanField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "tool" and not attrs.get("name"):
            raise ValidationError({"name": ['is required when type is "tool"']})
        if attrs["type"] != "tool" and "name" in attrs:
            raise ValidationError({"name": ['is allowed only when type is "tool"']})
        return attrs


class ToolConfigurationSerializer(Serializer):
    enabled = StrictBooleanField(required=False)
    allowed_tools = StrictListField(child=StrictCharField(), required=False)


class MCPServerSerializer(Serializer):
    type = StrictChoiceField(choices=["url"])
    url = StrictCharField(max_length=2048)
    name = StrictCharField(max_length=128)
    authorization_token = StrictCharField(required=False, write_only=True, help_text="Secret: never shown back.")
    tool_configuration = ToolConfigurationSerializer(required=False)

    def validate_url(self, value: str) -> str:
        parts = _http_url(value)
        if parts is None or parts.hostname is None:
            raise ValidationError("must be an http(s) URL")
        if not outbound.host_allowed(parts.hostname):
            raise ValidationError(f"{parts.hostname} is not allowed by this server's outbound policy")
        return value


class JSONSchemaFormatSerializer(Serializer):
    name = StrictCharField(max_length=64)
    schema = FreeJSONField(object_only=True)
    strict = StrictBooleanField(required=False)

    def validate_schema(self, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json_schema(value, require_object=False)


class ResponseFormatSerializer(Serializer):
    type = StrictChoiceField(choices=["text", "json_schema", "tool_call"])
    json_schema = JSONSchemaFormatSerializer(required=False)
    name = StrictCharField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "json_schema" and "json_schema" not in attrs:
            raise ValidationError({"json_schema": ['is required when type is "json_schema"']})
        return attrs


class CitationsSerializer(Serializer):
    enabled = StrictBooleanField()


# OpenAPI: messaging.schema.SystemFieldSchema (a string, SystemRequest, or an array of TextBlockRequest).
class SystemField(PlainMessages, serializers.Field):
    default_error_messages = {"invalid": "must be a string, an object {{prompt, citations?}} or an array of text blocks"}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, str):
            return {"prompt": data}
        if isinstance(data, list):
            blocks = _validate_blocks(data, ("text",))
            return {"prompt": "\n\n".join(block["text"] for block in blocks)}
        if not isinstance(data, dict):
            self.fail("invalid")
        return SYSTEM_SERIALIZER.run_validation(data)

    def to_representation(self, value: Any) -> Any:
        return value


class SystemSerializer(Serializer):
    prompt = StrictCharField(trim_whitespace=False, allow_blank=True)
    citations = CitationsSerializer(required=False)


SYSTEM_SERIALIZER = SystemSerializer()


class ThinkingSerializer(Serializer):
    type = StrictChoiceField(choices=["enabled", "disabled"])
    budget_tokens = StrictIntegerField(required=False, min_value=1024)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "enabled" and "budget_tokens" not in attrs:
            raise ValidationError({"budget_tokens": ['is required when type is "enabled"']})
        return attrs


# --- The request ----------------------------------------------------------------------------


class IdentifierField(StrictCharField):
    """Text a client chooses to find its messages by, which the service echoes in headers
    (X-Correlation-ID, to clients and providers) and logs: no control characters, so a CR or LF
    can never end a header or forge a log line."""

    default_error_messages = {"control_character": "must not contain control characters (U+{code:04X} at index {index})"}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Never fails (to_internal_value refuses first, saying where): it puts the rule in the
        # OpenAPI schema as a `pattern`, for generated clients and fuzzers.
        self.validators.append(RegexValidator(r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"))

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        found = CONTROL_CHARACTERS.search(value)
        if found:
            self.fail("control_character", code=ord(found.group()), index=found.start())
        return value


class MessageRequestSerializer(Serializer):
    """The chat request shared by /v1/messages/async, /v1/messages/validate and /v1/messages."""

    messages = MessageSerializer(many=True, allow_empty=False)
    model = StrictCharField(required=False, allow_null=True, help_text="A configured model (GET /v1/models); null means the default.")
    stream = StrictBooleanField(required=False, default=False)
    # The list may be null, its items may not: `many=True, allow_null=True` would allow both.
    tools = ListSerializer(child=ToolSerializer(), required=False, allow_null=True)
    tool_choice = ToolChoiceSerializer(required=False, allow_null=True)
    tool_context = StrictListField(
        child=FreeJSONField(allow_null=True), required=False, allow_null=True, write_only=True,
        help_text="Items handed to every MCP tool call in its `_meta.tool_context`, never to the model. "
        "Secret: never shown in the admin, logs, events or results.",
    )
    mcp_servers = ListSerializer(
        child=MCPServerSerializer(), required=False, allow_null=True, max_length=MAX_MCP_SERVERS,
        help_text="MCP servers whose tools the model may use: the service connects, offers their tools, runs the "
        "calls the model makes (mcp_tool_use / mcp_tool_result blocks) and lets the model continue.",
    )
    response_format = ResponseFormatSerializer(required=False, allow_null=True)
    system = SystemField(required=False, allow_null=True)
    thinking = ThinkingSerializer(required=False, allow_null=True)
    priority = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=10, help_text="0 (lowest) to 10 (highest); null means 5.")
    seed = StrictIntegerField(required=False, allow_null=True, min_value=INT64[0], max_value=INT64[1])
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = StrictFloatField(required=False, allow_null=True, above=0, max_value=1)
    min_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    top_k = StrictIntegerField(required=False, allow_null=True, min_value=0)
    repetition_penalty = StrictFloatField(required=False, allow_null=True, above=0)
    presence_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    frequency_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1, help_text="1 to the model's limit; null means the model's default.")
    correlation_id = IdentifierField(required=False, allow_null=True, max_length=255, help_text="At most 255 characters, no control characters.")
    # Sent by Anthropic's SDKs; not in the contract's table, accepted so the SDKs work as they are.
    stop_sequences = serializers.ListField(
        child=StrictCharField(trim_whitespace=False), required=False, allow_null=True, max_length=16,
        help_text="Stop when the answer would contain one of these (stop_reason `stop_sequence`).",
    )
    metadata = FreeJSONField(
        object_only=True, required=False, allow_null=True,
        help_text="Anthropic's `{user_id}`; kept with the message, not sent to the model.",
    )

    def collect(self, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validate every field, then the cross-field rules on the fields that passed.

        Returns (values, errors). DRF's own `to_internal_value` stops before the cross-field
        rules when any field fails; the contract wants every problem reported at once.
        """
        if not isinstance(data, dict):
            return {}, {"non_field_errors": [f"The request body must be a JSON object, not {_type_name(data)}."]}
        values: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for name, field_ in self.fields.items():
            primitive = data.get(name, empty)
            if primitive is empty and not field_.required and field_.default is empty:
                continue  # what DRF's SkipField would do, without raising for every absent field
            try:
                value = field_.run_validation(primitive)
            except ValidationError as exc:
                errors[name] = exc.detail
            except serializers.SkipField:
                continue
            else:
                values[name] = value
        _cross_field_errors(values, errors)
        return values, errors


def _cross_field_errors(values: dict[str, Any], errors: dict[str, Any]) -> None:
    def add(path: str, message: str) -> None:
        errors.setdefault(path, []).append(ErrorDetail(message, code="invalid"))

    # An absent or null model is the default model, whose limits apply just the same.
    spec = None
    if "model" not in errors:
        spec = catalog.get_model(values.get("model"))
        if spec is None:
            add("model", f'"{values["model"]}" is not a configured model; see GET /v1/models')

    max_tokens = values.get("max_tokens")
    if spec is not None and max_tokens is not None and max_tokens > spec.max_tokens:
        add("max_tokens", f"must be at most {spec.max_tokens}, the limit of {spec.id}")

    thinking = values.get("thinking")
    if thinking and thinking.get("type") == "enabled" and "max_tokens" not in errors:
        if max_tokens is not None:
            if thinking["budget_tokens"] >= max_tokens:
                add("thinking.budget_tokens", f"must be less than max_tokens ({max_tokens})")
        elif spec is not None and thinking["budget_tokens"] >= spec.default_max_tokens:
            add(
                "thinking.budget_tokens",
                f"must be less than max_tokens, which is null: {spec.id}'s default of {spec.default_max_tokens}",
            )

    tools = values.get("tools") or []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool["name"] in seen:
            add(f"tools[{index}].name", f'"{tool["name"]}" is used by an earlier tool; names must be unique')
        seen.add(tool["name"])

    servers = values.get("mcp_servers") or []
    server_names: set[str] = set()
    for index, server in enumerate(servers):
        if server["name"] in server_names:
            add(f"mcp_servers[{index}].name", f'"{server["name"]}" is used by an earlier server; names must be unique')
        server_names.add(server["name"])

    choice = values.get("tool_choice")
    has_tool_sources = bool(tools) or bool(servers) or "tools" in errors or "mcp_servers" in errors
    # A name can only be checked against `tools` when every tool parsed and no MCP server
    # (whose tools are known only when connecting) could provide it.
    names_known = not servers and "tools" not in errors and "mcp_servers" not in errors
    if choice and choice["type"] in ("any", "tool") and not has_tool_sources:
        add("tool_choice.type", f'"{choice["type"]}" needs tools or mcp_servers')
    elif choice and choice["type"] == "tool" and names_known and choice["name"] not in seen:
        add("tool_choice.name", f'"{choice["name"]}" is not one of the tools')

    response_format = values.get("response_format")
    if response_format and response_format["type"] == "tool_call":
        name = response_format.get("name")
        if not has_tool_sources:
            add("response_format.type", '"tool_call" needs tools or mcp_servers')
        elif name and names_known and name not in seen:
            add("response_format.name", f'"{name}" is not one of the tools')

    tool_uses: set[str] = set()
    mcp_tool_uses: set[str] = set()
    for m_index, message in enumerate(values.get("messages") or []):
        for b_index, block in enumerate(message["content"]):
            path = f"messages[{m_index}].content[{b_index}]"
            if block["type"] in ("mcp_tool_use", "mcp_tool_result") and message["role"] != "assistant":
                add(f"{path}.type", f'"{block["type"]}" blocks belong to assistant messages (the service made that call)')
            if block["type"] == "tool_use":
                tool_uses.add(block["id"])
            elif block["type"] == "mcp_tool_use":
                mcp_tool_uses.add(block["id"])
            elif block["type"] == "tool_result" and block["tool_use_id"] not in tool_uses:
                add(f"{path}.tool_use_id", f'"{block["tool_use_id"]}" does not match any earlier tool_use block')
            elif block["type"] == "mcp_tool_result" and block["tool_use_id"] not in mcp_tool_uses:
                add(f"{path}.tool_use_id", f'"{block["tool_use_id"]}" does not match any earlier mcp_tool_use block')


def _warnings(data: dict[str, Any], values: dict[str, Any], *, endpoint: str) -> list[str]:
    warnings: list[str] = []
    known = MESSAGE_REQUEST_SERIALIZER.fields
    unknown = [key for key in data if key not in known]
    if unknown:
        warnings.append(f"unknown fields are ignored: {', '.join(sorted(unknown))}")
    if values.get("metadata"):
        warnings.append("metadata is kept with the message but not sent to the model")
    if values.get("temperature") is not None and values.get("top_p") is not None:
        warnings.append("temperature and top_p are both set; set one of them")

    spec = catalog.get_model(values.get("model")) if "model" in values or "model" not in data else None
    if spec is not None:
        ignored = [f for f in catalog.SAMPLING_FIELDS if values.get(f) is not None and f not in spec.supports]
        if ignored:
            warnings.append(f"{spec.id} ignores {', '.join(ignored)}")
        temperature = values.get("temperature")
        if temperature is not None and temperature > 1 and spec.provider == "anthropic":
            warnings.append(f"temperature above 1 is capped at 1 by {spec.id}'s provider")
    if (values.get("repetition_penalty") or 0) > 2:
        warnings.append("repetition_penalty above 2 usually degrades output badly")

    messages = values.get("messages") or []
    for index in range(1, len(messages)):
        if messages[index]["role"] == messages[index - 1]["role"]:
            warnings.append(
                f"messages[{index - 1}] and messages[{index}] are both from {messages[index]['role']}; "
                "consecutive messages of one role are merged by most providers"
            )
    if messages and messages[0]["role"] == "assistant":
        warnings.append("messages[0] is from assistant; most providers expect the conversation to start with user")

    thinking = values.get("thinking")
    if thinking and thinking["type"] == "enabled":
        if messages and messages[-1]["role"] == "assistant":
            warnings.append("a final assistant message (prefill) is not supported together with thinking")
        if values.get("temperature") is not None and values["temperature"] != 1:
            warnings.append("thinking is enabled; temperature other than 1 is ignored or refused by providers")

    if endpoint == "async" and values.get("stream"):
        warnings.append(
            "stream: true on /v1/messages/async records every token delta, so "
            "GET /v1/messages/{message_id}/stream shows the answer as it is written; "
            "the response itself is still the 202 acknowledgement"
        )
    choice = values.get("tool_choice")
    if choice and choice["type"] in ("auto", "none") and not values.get("tools") and not values.get("mcp_servers"):
        warnings.append("tool_choice is given without tools; it has no effect")
    warnings.extend(_mcp_warnings(values))
    return warnings


def _mcp_warnings(values: dict[str, Any]) -> list[str]:
    """What the MCP servers will (not) do: /validate calls none of them, so it says so here."""
    warnings = []
    servers = values.get("mcp_servers") or []
    enabled = 0
    for index, server in enumerate(servers):
        configuration = server.get("tool_configuration") or {}
        if configuration.get("enabled") is False:
            warnings.append(f'mcp_servers[{index}] ("{server["name"]}") is disabled by tool_configuration.enabled: false; it is not contacted')
            continue
        enabled += 1
        if configuration.get("allowed_tools") == []:
            warnings.append(f'mcp_servers[{index}] ("{server["name"]}") has an empty allowed_tools list; it offers no tools')
    if values.get("tool_context") is not None and not enabled:
        warnings.append("tool_context is given only to MCP tool calls, and no MCP server is enabled; it is not used")
    return warnings


def _sent_count(raw: dict[str, Any], values: dict[str, Any], name: str) -> int:
    """How many items the client sent, even when some of them failed validation: the summary
    describes the body, so an invalid body still shows what it held."""
    sent = raw.get(name)
    return len(sent) if isinstance(sent, list) else len(values.get(name) or [])


def _summary(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    spec = catalog.get_model(values.get("model"))
    tool_count = _sent_count(raw, values, "tools")
    server_count = _sent_count(raw, values, "mcp_servers")
    choice = values.get("tool_choice")
    if choice:
        tool_choice = choice["type"]
    else:
        tool_choice = "auto" if tool_count or server_count else None
    max_tokens = values.get("max_tokens")
    if max_tokens is None and spec is not None:
        max_tokens = spec.default_max_tokens
    return {
        "message_count": _sent_count(raw, values, "messages"),
        "has_tools": bool(tool_count or server_count),
        "stream_enabled": bool(values.get("stream")),
        "tool_choice": tool_choice,
        "model": spec.id if spec is not None else values.get("model"),
        "tool_count": tool_count,
        "mcp_server_count": server_count,
        "max_tokens": max_tokens,
        "estimated_input_tokens": estimate_tokens(values) if "messages" in values else 0,
    }


MESSAGE_REQUEST_SERIALIZER = MessageRequestSerializer()


@dataclass
class CheckedRequest:
    """The outcome of checking one chat request."""

    data: Any
    values: dict[str, Any]
    errors: list[str]
    warnings: list[str]
    summary: dict[str, Any]

    @property
    def valid(self) -> bool:
        return not self.errors

    def normalized(self) -> dict[str, Any]:
        """The request as workers see it: defaults resolved, content always blocks."""
        values = dict(self.values)
        spec = catalog.get_model(values.get("model"))
        assert spec is not None, "only a valid request is normalized"
        values["model"] = spec.id
        if values.get("max_tokens") is None:
            values["max_tokens"] = spec.default_max_tokens
        if values.get("priority") is None:
            values["priority"] = 5
        return values

    def request_hash(self) -> str:
        return hashlib.sha256(orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_request(data: Any, *, endpoint: str) -> CheckedRequest:
    values, error_detail = MESSAGE_REQUEST_SERIALIZER.collect(data)
    raw = data if isinstance(data, dict) else {}
    return CheckedRequest(
        data=data,
        values=values,
        errors=flatten_errors(error_detail),
        warnings=_warnings(raw, values, endpoint=endpoint),
        summary=_summary(raw, values),
    )


def split_secrets(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request with secrets replaced by "[redacted]", the secrets) for storage."""
    public = dict(request)
    secrets: dict[str, Any] = {}
    if request.get("tool_context") is not None:
        secrets["tool_context"] = request["tool_context"]
        public["tool_context"] = REDACTED
    tokens = {}
    if request.get("mcp_servers"):
        servers = []
        for server in request["mcp_servers"]:
            server = dict(server)
            if "authorization_token" in server:
                tokens[server["name"]] = server["authorization_token"]
                server["authorization_token"] = REDACTED
            servers.append(server)
        public["mcp_servers"] = servers
    if tokens:
        secrets["mcp_tokens"] = tokens
    return public, secrets


def merge_secrets(public: dict[str, Any], secrets: dict[str, Any]) -> dict[str, Any]:
    """The full request for a worker, from what `split_secrets` stored."""
    request = dict(public)
    if "tool_context" in secrets:
        request["tool_context"] = secrets["tool_context"]
    tokens = secrets.get("mcp_tokens") or {}
    if tokens:
        request["mcp_servers"] = [
            {**server, "authorization_token": tokens[server["name"]]} if server["name"] in tokens else server
            for server in request["mcp_servers"]
        ]
    return request


# --- Responses --------------------------------------------------------------------------------


class UsageSerializer(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()


class ResultSerializer(serializers.Serializer):
    id = serializers.CharField()
    type = serializers.ChoiceField(choices=["message"])
    role = serializers.ChoiceField(choices=["assistant"])
    model = serializers.CharField()
    content = serializers.ListField(child=serializers.DictField(), help_text="Content blocks, as in Anthropic's Messages API.")
    stop_reason = serializers.CharField(allow_null=True)
    stop_sequence = serializers.CharField(allow_null=True, required=False)
    usage = UsageSerializer()


class ErrorInfoSerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()


class MessageListItemSerializer(serializers.Serializer):
    """An item of GET /v1/messages: a message's state without its `result`, so a page of a
    hundred messages stays small whatever they produced; GET /v1/messages/{message_id} has it.
    Built by hand in `message_state()` for speed; this class documents the shape for OpenAPI."""

    message_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Status.choices)
    model = serializers.CharField()
    priority = serializers.IntegerField()
    correlation_id = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    attempts = serializers.IntegerField()
    error = ErrorInfoSerializer(allow_null=True)


class MessageStateSerializer(MessageListItemSerializer):
    """GET /v1/messages/{message_id}."""

    result = ResultSerializer(allow_null=True)


def message_state(job: MessageJob, *, with_result: bool = True) -> dict[str, Any]:
    state = {
        "message_id": job.message_id,
        "status": job.status,
        "model": job.model,
        "priority": job.priority,
        "correlation_id": job.correlation_id,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "error": job.error,
    }
    if with_result:
        state["result"] = job.result
    return state


class AcceptedSerializer(serializers.Serializer):
    message_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Status.choices)
    message = serializers.CharField()
    correlation_id = serializers.CharField(allow_null=True, required=False)
    warnings = serializers.ListField(child=serializers.CharField(), required=False)


class RequestSummarySerializer(serializers.Serializer):
    message_count = serializers.IntegerField()
    has_tools = serializers.BooleanField()
    stream_enabled = serializers.BooleanField()
    tool_choice = serializers.CharField(allow_null=True)
    model = serializers.CharField(allow_null=True)
    tool_count = serializers.IntegerField()
    mcp_server_count = serializers.IntegerField()
    max_tokens = serializers.IntegerField(allow_null=True)
    estimated_input_tokens = serializers.IntegerField()


class ValidationResultSerializer(serializers.Serializer):
    valid = serializers.BooleanField()
    errors = serializers.ListField(child=serializers.CharField())
    warnings = serializers.ListField(child=serializers.CharField())
    request_summary = RequestSummarySerializer()


class MessageListSerializer(serializers.Serializer):
    data = MessageListItemSerializer(many=True)
    has_more = serializers.BooleanField()
    first_id = serializers.CharField(allow_null=True)
    last_id = serializers.CharField(allow_null=True)


class ModelInfoSerializer(serializers.Serializer):
    id = serializers.CharField()
    provider = serializers.CharField()
    max_tokens = serializers.IntegerField()
    supports = serializers.ListField(child=serializers.CharField())


class ModelListSerializer(serializers.Serializer):
    data = ModelInfoSerializer(many=True)


class ErrorDetailSerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()
    errors = serializers.ListField(child=serializers.CharField(), required=False)


class ErrorSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=["error"])
    error = ErrorDetailSerializer()
