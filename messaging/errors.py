"""One error shape for the whole API.

Exceptions carry their protocol data (HTTP status, `error.type`) as class attributes, and one
handler renders every error alike: `{"type": "error", "error": {"type", "message", "errors"?}}`.
Views raise; they never build error JSON by hand.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class APIError(exceptions.APIException):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    error_type = "api_error"
    default_detail = "The service failed to handle this request."


class InvalidRequest(APIError):
    status_code = status.HTTP_400_BAD_REQUEST
    error_type = "invalid_request_error"
    default_detail = "The request is not valid."

    def __init__(self, errors: list[str]):
        super().__init__(errors[0] if errors else self.default_detail)
        self.errors = errors


class Conflict(APIError):
    status_code = status.HTTP_409_CONFLICT
    error_type = "conflict_error"
    default_detail = "The request conflicts with the message's current state."


class RequestTooLarge(APIError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    error_type = "request_too_large"
    default_detail = "The request body is larger than this service accepts."


class RateLimited(APIError):
    """Refused at the door by a per-key limit (messaging/ratelimit.py): nothing was stored."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(APIError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    error_type = "overloaded_error"
    default_detail = "The service cannot accept requests right now; the request was not accepted."


# DRF's own exceptions, and Django's, mapped to the contract's error types.
_ERROR_TYPES: list[tuple[type[Exception], int, str]] = [
    (exceptions.ParseError, 400, "invalid_request_error"),
    (exceptions.ValidationError, 400, "invalid_request_error"),
    (exceptions.AuthenticationFailed, 401, "authentication_error"),
    (exceptions.NotAuthenticated, 401, "authentication_error"),
    (exceptions.PermissionDenied, 403, "permission_error"),
    (exceptions.NotFound, 404, "not_found_error"),
    (exceptions.MethodNotAllowed, 405, "method_not_allowed_error"),
    (exceptions.NotAcceptable, 406, "not_acceptable_error"),
    (exceptions.UnsupportedMediaType, 415, "unsupported_media_type_error"),
    (exceptions.Throttled, 429, "rate_limit_error"),
]


# A synchronous POST /v1/messages whose message ran and failed answers with the status and type
# that the contract's table (API.md section 1) gives for what went wrong; the message's own
# `error` (GET /v1/messages/{message_id}) keeps its precise type, which the answer's sentence
# names. The provider refusing the request's content is the client's to fix, like any invalid
# request. The provider's rate limit or overload, still there after our retries, is worth trying
# again later: 429, and 529 overloaded_error as Anthropic's API answers an overload (503 would
# say the request was not accepted, and this one was). Everything else is the service's side:
# its credentials or configuration at the provider, a timeout, an answer that breaks its
# schema, an MCP server that failed, a crash: 500 api_error.
FAILED_MESSAGE_RESPONSES: dict[str, tuple[int, str]] = {
    "invalid_request_error": (400, "invalid_request_error"),
    "request_too_large": (413, "request_too_large"),
    "rate_limit_error": (429, "rate_limit_error"),
    "overloaded_error": (529, "overloaded_error"),
    "authentication_error": (500, "api_error"),
    "permission_error": (500, "api_error"),
    "not_found_error": (500, "api_error"),
    "billing_error": (500, "api_error"),
    "timeout_error": (500, "api_error"),
    "invalid_output_error": (500, "api_error"),
    "mcp_error": (500, "api_error"),
    "api_error": (500, "api_error"),
}


def failed_message(message_id: str, status: str, error: dict[str, str] | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, error body) of a synchronous request whose message ended `failed` or `error`."""
    error = error or {"type": "api_error", "message": "The message did not complete."}
    http_status, error_type = FAILED_MESSAGE_RESPONSES.get(error["type"], (500, "api_error"))
    what = "failed" if status == "failed" else "ended in error"
    message = f"Message {message_id} {what} ({error['type']}): {error['message']}"
    return http_status, error_body(error_type, message, [message] if http_status == 400 else None)


def error_body(error_type: str, message: str, errors: list[str] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if errors is not None:
        error["errors"] = errors
    return {"type": "error", "error": error}


def flatten_errors(detail: Any, path: str = "") -> list[str]:
    """DRF's nested error detail as `json.path: message` lines, in field order."""
    if isinstance(detail, dict):
        lines = []
        for key, value in detail.items():
            if key in ("non_field_errors", "__all__"):
                lines.extend(flatten_errors(value, path))
            elif isinstance(key, int):
                lines.extend(flatten_errors(value, f"{path}[{key}]"))
            else:
                lines.extend(flatten_errors(value, f"{path}.{key}" if path else str(key)))
        return lines
    if isinstance(detail, list):
        if all(isinstance(item, str) for item in detail):
            return [f"{path}: {item}" if path else str(item) for item in detail]
        lines = []
        for index, item in enumerate(detail):
            if item:  # a list serializer reports {} for the items that are fine
                lines.extend(flatten_errors(item, f"{path}[{index}]"))
        return lines
    return [f"{path}: {detail}" if path else str(detail)]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER."""
    http_status, body, headers = describe(exc, where=context.get("view").__class__.__name__)
    return Response(body, status=http_status, headers=headers)


def error_response(exc: Exception, *, where: str) -> HttpResponse:
    """The same error for the async views that DRF cannot host (streams, POST /v1/messages)."""
    http_status, body, headers = describe(exc, where=where)
    return HttpResponse(orjson.dumps(body), status=http_status, headers=headers, content_type="application/json")


def describe(exc: Exception, *, where: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, error body, headers) for any exception a request can meet."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    elif isinstance(exc, (OperationalError, InterfaceError)) or _is_broker_outage(exc):
        logger.warning("store or broker unavailable: %s: %s", type(exc).__name__, exc)
        exc = Overloaded()
    elif isinstance(exc, exceptions.NotAuthenticated):
        # DRF's "Authentication credentials were not provided." does not say what to send.
        exc = exceptions.NotAuthenticated("No API key: send Authorization: Bearer <key>, or x-api-key: <key>.")
    elif not isinstance(exc, exceptions.APIException):
        logger.exception("unhandled error in %s", where)
        exc = APIError()

    headers: dict[str, str] = {}
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        headers["Retry-After"] = str(int(exc.wait) + 1)
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, (exceptions.AuthenticationFailed, exceptions.NotAuthenticated)):
        headers["WWW-Authenticate"] = 'Bearer realm="api"'

    if isinstance(exc, APIError):
        http_status, error_type = exc.status_code, exc.error_type
    else:
        http_status, error_type = next(
            ((code, name) for cls, code, name in _ERROR_TYPES if isinstance(exc, cls)),
            (exc.status_code, "api_error"),
        )

    if isinstance(exc, InvalidRequest):
        body = error_body(error_type, str(exc.detail), exc.errors)
    elif isinstance(exc, exceptions.ValidationError):
        errors = flatten_errors(exc.detail)
        body = error_body(error_type, errors[0] if errors else "The request is not valid.", errors)
    elif isinstance(exc, exceptions.ParseError):
        message = str(exc.detail)
        body = error_body(error_type, message, [message])
    else:
        body = error_body(error_type, str(exc.detail))
    return http_status, body, headers


def _is_broker_outage(exc: Exception) -> bool:
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is in requirements
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or (
        isinstance(exc, DatabaseError) and "locked" in str(exc)
    )


def _is_api_path(request: HttpRequest) -> bool:
    return not request.path.startswith("/admin/")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api_path(request):
        from django.views.defaults import page_not_found as django_page_not_found

        return django_page_not_found(request, exception)
    return JsonResponse(error_body("not_found_error", f"No route for {request.path}."), status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    if not _is_api_path(request):
        from django.views.defaults import server_error as django_server_error

        return django_server_error(request)
    return JsonResponse(error_body("api_error", "The service failed to handle this request."), status=500)
