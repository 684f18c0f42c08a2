"""OpenAPI examples and error responses, kept apart so the views read straight down.

The examples are the contract's (API.md); tests check that the service really answers them.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiExample, OpenApiResponse

from messaging.serializers import ErrorSerializer


def _error_example(status: int, error_type: str, message: str, errors: bool = False) -> OpenApiExample:
    error = {"type": error_type, "message": message}
    if errors:
        error["errors"] = [message]
    return OpenApiExample(error_type, value={"type": "error", "error": error}, status_codes=[str(status)], response_only=True)


ERROR_RESPONSES = {
    400: OpenApiResponse(
        ErrorSerializer,
        description="Bad JSON or failed validation; `error.errors` lists every problem.",
        examples=[_error_example(400, "invalid_request_error", 'messages[1].role: "system" is not one of user, assistant', errors=True)],
    ),
    401: OpenApiResponse(
        ErrorSerializer,
        description="Missing, wrong or revoked API key.",
        examples=[_error_example(401, "authentication_error", "The API key is not valid.")],
    ),
    404: OpenApiResponse(
        ErrorSerializer,
        description="No such message for this key's owner.",
        examples=[_error_example(404, "not_found_error", "No message with message_id 'msg_01J9Z3'.")],
    ),
    409: OpenApiResponse(
        ErrorSerializer,
        description="message_id reused with a different body, or cancel of a message that completed, "
        "failed or ended in error (cancelling a cancelled message is 200).",
        examples=[_error_example(409, "conflict_error", "Message msg_01J9Z3 has already completed; it cannot be cancelled.")],
    ),
    413: OpenApiResponse(
        ErrorSerializer,
        description="The body is over the size limit.",
        examples=[_error_example(413, "request_too_large", "The request body is larger than 4194304 bytes.")],
    ),
    415: OpenApiResponse(
        ErrorSerializer,
        description="The body is not application/json.",
        examples=[_error_example(415, "unsupported_media_type_error", 'Unsupported media type "application/x-www-form-urlencoded" in request.')],
    ),
    503: OpenApiResponse(
        ErrorSerializer,
        description="Database or broker unavailable; the request was NOT accepted.",
        examples=[_error_example(503, "overloaded_error", "The service cannot accept requests right now; the request was not accepted.")],
    ),
}

# POST /v1/messages: a message that ran and failed answers with the status and type of
# messaging.errors.FAILED_MESSAGE_RESPONSES, in a sentence naming the message's own error type.
_FAILED = "Message msg_01J9Z3QK8ZB4VQX7R3W5T2Y6N1 failed"
CREATE_MESSAGE_ERRORS = {
    400: OpenApiResponse(
        ErrorSerializer,
        description="Bad JSON or failed validation (nothing ran), or the message ran and the provider refused "
        "the request's content (`Message … failed (invalid_request_error): …`). `error.errors` lists every problem.",
        examples=[
            _error_example(400, "invalid_request_error", 'messages[1].role: "system" is not one of user, assistant', errors=True),
            _error_example(
                400, "invalid_request_error",
                f'{_FAILED} (invalid_request_error): The openai provider for model "gpt-4o-mini" answered 400: '
                "Invalid 'messages[0].content': string too long.",
                errors=True,
            ),
        ],
    ),
    409: OpenApiResponse(ErrorSerializer, description="The message was cancelled (by staff) before it finished."),
    413: OpenApiResponse(
        ErrorSerializer,
        description="The body is over the size limit, or the message ran and the provider found it too large.",
        examples=[_error_example(413, "request_too_large", "The request body is larger than 4194304 bytes.")],
    ),
    429: OpenApiResponse(
        ErrorSerializer,
        description="The message ran and the provider's rate limit still held after the service's own retries: "
        "try again later. (No Retry-After: the service does not know when the provider's limit resets.)",
        examples=[_error_example(429, "rate_limit_error", f'{_FAILED} (rate_limit_error): The openai provider for model "gpt-4o-mini" answered 429 (4 attempts): Rate limit reached.')],
    ),
    500: OpenApiResponse(
        ErrorSerializer,
        description="The message ran and failed on the service's side: the provider refused the service's "
        "credentials or does not know the model, timed out or failed, the answer broke its schema, an MCP server "
        "failed. The sentence names the message's own `error.type` (GET /v1/messages/{message_id} keeps it).",
        examples=[_error_example(500, "api_error", f'{_FAILED} (timeout_error): The openai provider for model "gpt-4o-mini" did not answer within its timeout (ReadTimeout) (4 attempts).')],
    ),
    503: ERROR_RESPONSES[503],
    529: OpenApiResponse(
        ErrorSerializer,
        description="The message ran and the provider was still overloaded after the service's own retries "
        "(Anthropic's status for an overload): try again later.",
        examples=[_error_example(529, "overloaded_error", f'{_FAILED} (overloaded_error): The anthropic provider for model "claude-sonnet" answered 529 (4 attempts): Overloaded')],
    ),
}

ERRORS_AUTH = {401: ERROR_RESPONSES[401]}
ERRORS_AUTH_PARSE_NO_400 = {401: ERROR_RESPONSES[401], 413: ERROR_RESPONSES[413], 415: ERROR_RESPONSES[415]}
ERRORS_AUTH_PARSE = {400: ERROR_RESPONSES[400], **ERRORS_AUTH_PARSE_NO_400}

EXAMPLE_REQUEST = {
    "model": "echo",
    "system": "You are terse.",
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ],
    "max_tokens": 1024,
    "priority": 5,
    "correlation_id": "order-42",
}

VALIDATE_EXAMPLES = [
    OpenApiExample("A chat request", value=EXAMPLE_REQUEST, request_only=True),
    OpenApiExample(
        "Valid",
        value={
            "valid": True,
            "errors": [],
            "warnings": [],
            "request_summary": {
                "message_count": 1,
                "has_tools": True,
                "stream_enabled": False,
                "tool_choice": "auto",
                "model": "echo",
                "tool_count": 1,
                "mcp_server_count": 0,
                "max_tokens": 1024,
                "estimated_input_tokens": 39,
            },
        },
        response_only=True,
        status_codes=["200"],
    ),
    OpenApiExample(
        "Invalid",
        value={
            "valid": False,
            "errors": ['messages[1].role: "system" is not one of user, assistant'],
            "warnings": ["temperature and top_p are both set; set one of them"],
            "request_summary": {
                "message_count": 0,
                "has_tools": False,
                "stream_enabled": False,
                "tool_choice": None,
                "model": "echo",
                "tool_count": 0,
                "mcp_server_count": 0,
                "max_tokens": 1024,
                "estimated_input_tokens": 0,
            },
        },
        response_only=True,
        status_codes=["200"],
    ),
]

ASYNC_EXAMPLES = [
    OpenApiExample("A chat request", value=EXAMPLE_REQUEST, request_only=True),
    OpenApiExample(
        "Accepted",
        value={
            "message_id": "msg_01J9Z3QK8ZB4VQX7R3W5T2Y6N1",
            "status": "pending",
            "message": "Request initiated successfully",
            "correlation_id": "order-42",
        },
        response_only=True,
        status_codes=["202"],
    ),
    OpenApiExample(
        "Already accepted",
        value={
            "message_id": "order-42-attempt-1",
            "status": "processing",
            "message": "Request already accepted",
            "correlation_id": "order-42",
        },
        response_only=True,
        status_codes=["200"],
    ),
]

STATE_EXAMPLES = [
    OpenApiExample(
        "Completed",
        value={
            "message_id": "msg_01J9Z3QK8ZB4VQX7R3W5T2Y6N1",
            "status": "completed",
            "model": "echo",
            "priority": 5,
            "correlation_id": "order-42",
            "created_at": "2026-11-22T10:00:00.000000Z",
            "started_at": "2026-11-22T10:00:00.020000Z",
            "finished_at": "2026-11-22T10:00:00.090000Z",
            "attempts": 1,
            "result": {
                "id": "msg_01J9Z3QK8ZB4VQX7R3W5T2Y6N1",
                "type": "message",
                "role": "assistant",
                "model": "echo",
                "content": [{"type": "text", "text": "What is the weather in Paris?"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 39, "output_tokens": 6},
            },
            "error": None,
        },
        response_only=True,
        status_codes=["200"],
    ),
]
