"""drf-spectacular extensions: how the API key authentication appears in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


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


def _sse_response(description: str) -> Any:
    from drf_spectacular.types import OpenApiTypes
    from drf_spectacular.utils import OpenApiExample, OpenApiResponse

    return OpenApiResponse(
        OpenApiTypes.STR,
        description=description,
        examples=[OpenApiExample("A completed message", value=_SSE_EXAMPLE, response_only=True)],
    )


def _documentation_views() -> list[tuple[str, str, str, Any]]:
    from drf_spectacular.types import OpenApiTypes
    from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
    from rest_framework.views import APIView

    from messaging import docs
    from messaging.serializers import MessageRequestSerializer, ResultSerializer
    from messaging.views import MessageListView

    class StreamMessage(APIView):
        @extend_schema(
            operation_id="stream_message",
            summary="Follow a message's events as Server-Sent Events",
            description="Replays every stored event, then follows live ones, and closes after the "
            "terminal `status` event. Resume with `Last-Event-ID: N` or `?starting_after=N` to get "
            "exactly the events after N. " + _SSE_DESCRIPTION,
            parameters=[
                OpenApiParameter("starting_after", int, description="Only events after this sequence number."),
                OpenApiParameter(
                    "Last-Event-ID", int, OpenApiParameter.HEADER,
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
            operation_id="create_message",
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
                400: docs.ERROR_RESPONSES[400],
                409: OpenApiResponse(docs.ErrorSerializer, description="The message was cancelled (by staff) before it finished."),
                **docs.ERRORS_AUTH_PARSE_NO_400,
                500: OpenApiResponse(docs.ErrorSerializer, description="The message failed; `error.type` says why (e.g. `timeout_error`)."),
                503: docs.ERROR_RESPONSES[503],
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
