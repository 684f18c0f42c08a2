"""drf-spectacular extensions: how the API key authentication, the request's polymorphic
fields (content blocks, the system prompt) and the event streams appear in the OpenAPI schema."""

from __future__ import annotations

from copy import deepcopy
from functools import cache
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.plumbing import get_lib_doc_excludes
from drf_spectacular.utils import PolymorphicProxySerializer
from rest_framework import serializers


class APIKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "messaging.auth.APIKeyAuthentication"
    name = ["BearerAuth", "ApiKeyAuth"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        # Either header will do: two alternatives, not one requirement naming both.
        return [{"BearerAuth": []}, {"ApiKeyAuth": []}]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
            {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "x-api-key: <key>"},
        ]


# --- The request body ----------------------------------------------------------------------------
# Generated clients name their classes after components: the body is `ChatRequest` and each of
# its messages a `ChatMessageRequest` (drf-spectacular adds "Request" to request components),
# not `MessageRequestRequest` beside a `MessageRequest` that is one message of it.


class ChatRequestSchema(OpenApiSerializerExtension):
    target_class = "messaging.serializers.MessageRequestSerializer"

    def get_name(self, auto_schema: Any, direction: str) -> str:
        return "Chat"

    def map_serializer(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(self.target_class, direction, bypass_extensions=True)
        # openapi-typescript makes a property with a default required ("defaultNonNullable"), so a
        # TypeScript client would have to send `stream: false`; the default is said in words.
        stream = schema["properties"]["stream"]
        stream.pop("default", None)
        stream["description"] = "Default false. On POST /v1/messages: answer as Server-Sent Events. On /async: record every token delta."
        return schema


class ChatMessageSchema(OpenApiSerializerExtension):
    target_class = "messaging.serializers.MessageSerializer"

    def get_name(self, auto_schema: Any, direction: str) -> str:
        return "ChatMessage"


# --- Content blocks and the system prompt --------------------------------------------------------
# These fields accept a string or an array of blocks, which no serializer expresses. Each block
# shape is its own component (TextBlockRequest, ...), and an array of blocks is a `oneOf` of them
# with a discriminator whose mapping is explicit, which openapi-python-client and
# openapi-typescript turn into a tagged union.


@cache
def _block_union(component_name: str, kinds: tuple[str, ...]) -> PolymorphicProxySerializer:
    # One instance per union: drf-spectacular tells components apart by identity.
    from messaging.serializers import BLOCK_SERIALIZERS

    return PolymorphicProxySerializer(
        component_name=component_name,
        # Classes, not the shared instances validation uses: the extension sets attributes on them.
        serializers={kind: type(BLOCK_SERIALIZERS[kind]) for kind in kinds},
        resource_type_field_name="type",
    )


def _string_or_blocks(auto_schema: Any, direction: str, union: PolymorphicProxySerializer, *, non_empty: bool) -> dict[str, Any]:
    blocks = auto_schema.resolve_serializer(union, direction).ref
    string: dict[str, Any] = {"type": "string"}
    array: dict[str, Any] = {"type": "array", "items": blocks}
    if non_empty:
        string["minLength"] = 1
        array["minItems"] = 1
    return {"oneOf": [string, array]}


class ContentFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "messaging.serializers.ContentField"

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        from messaging.serializers import CONTENT_BLOCK_TYPES

        union = _block_union("ContentBlock", CONTENT_BLOCK_TYPES)
        return {
            **_string_or_blocks(auto_schema, direction, union, non_empty=True),
            "description": "A non-empty string (one text block), or a non-empty array of content blocks.",
        }


class ToolResultContentFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "messaging.serializers.ToolResultContentField"

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        union = _block_union("ToolResultContentBlock", ("text", "image"))
        return {
            **_string_or_blocks(auto_schema, direction, union, non_empty=False),
            "description": "The tool's output: a string, or an array of text and image blocks.",
        }


class SystemFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "messaging.serializers.SystemField"

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        from messaging.serializers import BLOCK_SERIALIZERS, SystemSerializer

        text_block = type(BLOCK_SERIALIZERS["text"])
        return {
            "oneOf": [
                {"type": "string"},
                auto_schema.resolve_serializer(SystemSerializer, direction).ref,
                {"type": "array", "items": auto_schema.resolve_serializer(text_block, direction).ref},
            ],
            "description": "The system prompt: `{prompt, citations?}`, a plain string, or (as Anthropic's "
            "SDKs send it) an array of text blocks, joined with blank lines.",
        }


class FreeJSONFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "messaging.serializers.FreeJSONField"

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        # Any JSON value, unless the field takes objects only (tool inputs, JSON Schemas, metadata).
        return {"type": "object", "additionalProperties": {}} if self.target.object_only else {}


class StrictFloatFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "messaging.serializers.StrictFloatField"

    def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if self.target.above is not None:  # "above 0": OpenAPI 3.0's exclusive minimum
            schema.update(minimum=self.target.above, exclusiveMinimum=True)
        return schema


def lib_doc_excludes() -> list[type]:
    """drf-spectacular's GET_LIB_DOC_EXCLUDES: a component's description is its own serializer's
    docstring, never the one our base classes share ("Refuses a non-object with a sentence...")."""
    from messaging.serializers import PlainMessages, Serializer

    return [*get_lib_doc_excludes(), Serializer, PlainMessages]


# --- The async views (messaging.streaming), which DRF cannot host ---------------------------------
# drf-spectacular documents DRF views only. These classes describe the two async operations
# for the schema; the URLconf routes the real requests to messaging.streaming.

_SSE_DESCRIPTION = (
    "Server-Sent Events. Each event has `id:` (its sequence number 1, 2, 3…), `event:` (its type) "
    "and `data:` (JSON with the same `type` and a `sequence_number`). Types: `status` "
    "(pending, processing, then one terminal status), Anthropic's `message_start`, "
    "`content_block_start`, `content_block_delta` (`text_delta`, `thinking_delta`, "
    "`input_json_delta`), `content_block_stop`, `message_delta`, `message_stop`, and `error`. "
    "A `: ping` comment goes out after 15 s of silence. The stream closes after the terminal "
    "`status` event."
)

_SSE_EXAMPLE = (
    'id: 1\nevent: status\ndata: {"type":"status","status":"pending","sequence_number":1}\n\n'
    'id: 2\nevent: status\ndata: {"type":"status","status":"processing","attempt":1,"sequence_number":2}\n\n'
    'id: 3\nevent: message_start\ndata: {"type":"message_start","message":{"id":"msg_01J9Z3QK8ZB4VQX7R3W5T2Y6N1",'
    '"type":"message","role":"assistant","model":"echo","content":[],"stop_reason":null,"stop_sequence":null,'
    '"usage":{"input_tokens":3,"output_tokens":0}},"sequence_number":3}\n\n'
    'id: 4\nevent: content_block_start\ndata: {"type":"content_block_start","index":0,'
    '"content_block":{"type":"text","text":""},"sequence_number":4}\n\n'
    'id: 5\nevent: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    '"delta":{"type":"text_delta","text":"Hello"},"sequence_number":5}\n\n'
    'id: 6\nevent: content_block_stop\ndata: {"type":"content_block_stop","index":0,"sequence_number":6}\n\n'
    'id: 7\nevent: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    '"stop_sequence":null},"usage":{"output_tokens":1},"sequence_number":7}\n\n'
    'id: 8\nevent: message_stop\ndata: {"type":"message_stop","sequence_number":8}\n\n'
    'id: 9\nevent: status\ndata: {"type":"status","status":"completed","sequence_number":9}\n\n'
)


@cache
def _server_sent_event() -> Any:
    # One class, or drf-spectacular would see two components of one name.
    from drf_spectacular.utils import inline_serializer

    return inline_serializer(
        "ServerSentEvent",
        fields={
            "id": serializers.CharField(
                required=False,
                help_text="The event's sequence number (1, 2, 3…): resume after it with `Last-Event-ID`. "
                "Absent on Anthropic's `ping` events.",
            ),
            "event": serializers.CharField(help_text="The event's type, the same as `type` in its data."),
            "data": serializers.CharField(help_text="The event as JSON, with `type` and `sequence_number`."),
        },
    )


class EventStream(serializers.Serializer):
    """Documentation only: the body of a text/event-stream response (EventStreamSchema)."""


class EventStreamSchema(OpenApiSerializerExtension):
    # OpenAPI 3.0 has no `itemSchema` (3.2) to describe a stream's events apart from its body.
    # Schemathesis checks each event against the schema, while a generated client reads the
    # body as text (openapi-python-client would call `ServerSentEvent.from_dict(response.text)`
    # and crash on a plain event object): a union of the two holds for both.
    target_class = EventStream

    def map_serializer(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        return {
            "oneOf": [{"type": "string"}, auto_schema.resolve_serializer(_server_sent_event(), direction).ref],
            "description": "The stream as text, as a client that reads the whole body gets it; "
            "each of its events has the shape of ServerSentEvent.",
        }


def _sse_response(description: str) -> Any:
    from drf_spectacular.utils import OpenApiExample, OpenApiResponse

    delta = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"},"sequence_number":5}'
    return OpenApiResponse(
        EventStream,
        description=f"{description} A completed message's stream:\n\n```\n{_SSE_EXAMPLE}```",
        examples=[
            OpenApiExample("An event", value={"id": "5", "event": "content_block_delta", "data": delta}, response_only=True)
        ],
    )


def _documentation_views() -> list[tuple[str, str, str, Any]]:
    from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
    from rest_framework.views import APIView

    from messaging import docs
    from messaging.serializers import MessageRequestSerializer, ResultSerializer
    from messaging.streaming import MAX_SEQUENCE
    from messaging.views import MessageListView

    sequence = {"type": "integer", "minimum": 0, "maximum": MAX_SEQUENCE}

    class StreamMessage(APIView):
        @extend_schema(
            operation_id="messages_stream",
            summary="Follow a message's events as Server-Sent Events",
            description="Replays every stored event, then follows live ones, and closes after the "
            "terminal `status` event. Resume with `Last-Event-ID: N` or `?starting_after=N` to get "
            "exactly the events after N. " + _SSE_DESCRIPTION,
            parameters=[
                OpenApiParameter("starting_after", sequence, description="Only events after this sequence number."),
                OpenApiParameter(
                    "Last-Event-ID", sequence, OpenApiParameter.HEADER,
                    description="Sent by a reconnecting EventSource; wins over starting_after.",
                ),
            ],
            responses={
                (200, "text/event-stream"): _sse_response("The message's events."),
                400: docs.ERROR_RESPONSES[400],
                404: docs.ERROR_RESPONSES[404],
                **docs.ERRORS_AUTH,
            },
            tags=["messages"],
        )
        def get(self, request: Any, message_id: str) -> Any:  # pragma: no cover - documentation only
            raise NotImplementedError

    class CreateMessage(APIView):
        @extend_schema(
            operation_id="messages_create",
            summary="Run a chat request and answer with its result",
            description="The synchronous form, and a drop-in for Anthropic's Messages API. "
            "`stream: false` answers 200 with the message (Anthropic's Message object); "
            "`stream: true` answers with the same events as the stream endpoint. The request is "
            "recorded as a message (GET /v1/messages lists it) and runs at once, without waiting "
            "in the queue; a client that disconnects cancels it. Requests carrying an "
            "`anthropic-version` header get Anthropic's exact stream: no `status` events, and "
            "`event: ping` keep-alives. The message's id is in `X-Message-ID`; validation "
            "warnings in `X-Warnings` (a JSON array).",
            request=MessageRequestSerializer,
            responses={
                (200, "application/json"): OpenApiResponse(ResultSerializer, description="The completed message."),
                (200, "text/event-stream"): _sse_response("With `stream: true`: the message's events."),
                **docs.ERRORS_AUTH_PARSE_NO_400,
                **docs.CREATE_MESSAGE_ERRORS,
            },
            examples=docs.ASYNC_EXAMPLES[:1],
            tags=["messages"],
        )
        def post(self, request: Any) -> Any:  # pragma: no cover - documentation only
            raise NotImplementedError

    return [
        ("/v1/messages", r"^v1/messages$", "GET", MessageListView.as_view()),
        ("/v1/messages", r"^v1/messages$", "POST", CreateMessage.as_view()),
        ("/v1/messages/{message_id}/stream", r"^v1/messages/(?P<message_id>[^/]+)/stream$", "GET", StreamMessage.as_view()),
    ]


def add_async_views(endpoints: list[tuple[str, str, str, Any]], **kwargs: Any) -> list[tuple[str, str, str, Any]]:
    """drf-spectacular PREPROCESSING_HOOK: document the async views alongside the DRF ones."""
    return [*endpoints, *_documentation_views()]


# --- Rate limits (messaging/ratelimit.py) ---------------------------------------------------------

_RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": {
        "schema": {"type": "integer"},
        "description": "Requests per minute this API key may make. Sent when the key has a rate limit.",
    },
    "x-ratelimit-remaining-requests": {
        "schema": {"type": "integer"},
        "description": "Requests left in the key's current one-minute window.",
    },
    "x-ratelimit-reset-requests": {
        "schema": {"type": "string"},
        "description": "Time until the window ends and the whole budget is back, as OpenAI writes it: "
        "`450ms`, `1s`, `59.5s`, `1m0s`.",
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer"},
        "description": "Whole seconds to wait before trying again. Always sent when the API key's own limits refuse the request.",
    }
}
_RATE_429 = "Past this API key's requests per minute (`x-ratelimit-*` say when the budget is back); nothing was done."
_CAP_429 = (
    "Refused by this API key's limits, and nothing was stored: past its requests per minute "
    "(`x-ratelimit-*` say when the budget is back), or at its cap on unfinished (pending and "
    "processing) messages."
)
_REPEAT = " A repeat of an existing message_id is never refused for the cap: it answers as before."
_LIMIT_EXAMPLES = {
    "RateLimitRequests": {
        "summary": "rate_limit_error (requests per minute)",
        "value": {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached: this API key may make 60 requests per minute; try again in 37 s."}},
    },
    "RateLimitUnfinished": {
        "summary": "rate_limit_error (unfinished messages)",
        "value": {"type": "error", "error": {"type": "rate_limit_error", "message": "Too many unfinished messages: this API key allows 20 pending or processing messages for its owner; try again when one has finished."}},
    },
}
_CAP_DESCRIPTIONS = {("/v1/messages/async", "post"): _CAP_429 + _REPEAT, ("/v1/messages", "post"): _CAP_429}


def add_rate_limits(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING_HOOK: every operation that needs a key may answer 429, and
    every answer to a counted request carries the x-ratelimit-* headers (a 401 was not counted)."""
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            if "401" not in responses:
                continue  # no key needed: nothing counted
            creates = (path, method) in _CAP_DESCRIPTIONS
            description = _CAP_DESCRIPTIONS.get((path, method), _RATE_429)
            examples = deepcopy(_LIMIT_EXAMPLES if creates else {"RateLimitRequests": _LIMIT_EXAMPLES["RateLimitRequests"]})
            if "429" in responses:  # POST /v1/messages: also the provider's limit, after a run
                existing = responses["429"]
                existing["description"] = f"{description}\n\nAlso: {existing['description']}"
                existing["content"]["application/json"].setdefault("examples", {}).update(examples)
            else:
                responses["429"] = {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "examples": examples}},
                    "description": description,
                }
            for status, response in responses.items():
                if status != "401":
                    headers = {**_RATE_LIMIT_HEADERS, **(_RETRY_AFTER if status == "429" else {})}
                    response["headers"] = {**response.get("headers", {}), **deepcopy(headers)}
            operation["responses"] = dict(sorted(responses.items()))
    return result
