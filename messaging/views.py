from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from messaging import catalog, docs, jobs, ratelimit
from messaging.errors import InvalidRequest
from messaging.models import MessageJob, Status, WorkerHeartbeat
from messaging.parsers import read_json_body
from messaging.serializers import (
    MESSAGE_ID,
    RESERVED_MESSAGE_IDS,
    AcceptedSerializer,
    MessageListSerializer,
    MessageRequestSerializer,
    MessageStateSerializer,
    ModelListSerializer,
    ValidationResultSerializer,
    check_request,
    message_state,
)


def get_message(request: Request, message_id: str) -> MessageJob:
    """The caller's message; another owner's is 404 like a missing one, never 403."""
    job = None
    # Only ids that could have been given out are looked up (PostgreSQL refuses a NUL in a query).
    if MESSAGE_ID.fullmatch(message_id):
        job = MessageJob.objects.filter(owner=request.user.name, message_id=message_id).first()
    if job is None:
        raise NotFound(f"No message with message_id {message_id!r}.")
    return job


class JSONOnly(BaseContentNegotiation):
    """The API speaks JSON only; DRF's negotiation would parse Accept on every request to
    arrive at the same answer (its docs' "IgnoreClientContentNegotiation")."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        return parsers[0]

    def select_renderer(self, request: Request, renderers: list[Any], format_suffix: str | None = None) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


class ApiView(APIView):
    content_negotiation_class = JSONOnly
    throttle_classes = [ratelimit.PerKeyRateThrottle]

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        ratelimit.add_headers(request._request, response)  # errors too: every counted request
        return response


class JSONBodyView(ApiView):
    """A view whose POST body must be a JSON object: `self.json_body`, read as every view reads
    one (`read_json_body`: chunked bodies too, which DRF's `request.data` would take for empty)."""

    json_body: Any = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if request.method == "POST":  # other methods answer 405 first
            self.json_body = read_json_body(request)


class ValidateView(JSONBodyView):
    @extend_schema(
        operation_id="messages_validate",
        summary="Check a chat request without running it",
        description="Always 200 for a JSON body: `errors` lists every problem at once, `warnings` "
        "what would be ignored or surprising. Nothing is stored, nothing is called.",
        request=MessageRequestSerializer,
        responses={200: ValidationResultSerializer, **docs.ERRORS_AUTH_PARSE},
        examples=docs.VALIDATE_EXAMPLES,
        tags=["messages"],
    )
    def post(self, request: Request) -> Response:
        checked = check_request(self.json_body, endpoint="validate")
        return Response(
            {
                "valid": checked.valid,
                "errors": checked.errors,
                "warnings": checked.warnings,
                "request_summary": checked.summary,
            }
        )


class AsyncMessageView(JSONBodyView):
    @extend_schema(
        operation_id="messages_create_async",
        summary="Submit a chat request to run in the background",
        description="Validates like /v1/messages/validate; a valid request is stored and queued "
        "in one transaction and answered 202 at once. With `?message_id=`, sending the same body "
        "again is idempotent (200 with the current status); a different body is 409.",
        parameters=[
            OpenApiParameter(
                "message_id",
                str,
                description="Your own id for the message: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`, "
                "not `async` or `validate`, unique per owner.",
            )
        ],
        request=MessageRequestSerializer,
        responses={
            202: OpenApiResponse(AcceptedSerializer, description="Accepted and queued."),
            200: OpenApiResponse(AcceptedSerializer, description="Already accepted with this message_id and body."),
            400: docs.ERROR_RESPONSES[400],
            409: docs.ERROR_RESPONSES[409],
            **docs.ERRORS_AUTH_PARSE_NO_400,
            503: docs.ERROR_RESPONSES[503],
        },
        examples=docs.ASYNC_EXAMPLES,
        tags=["messages"],
    )
    def post(self, request: Request) -> Response:
        message_id = request.query_params.get("message_id")
        # fullmatch: `$` also matches before a final newline, and the id goes into Location.
        if message_id is not None and (not MESSAGE_ID.fullmatch(message_id) or message_id in RESERVED_MESSAGE_IDS):
            raise InvalidRequest(
                [f"message_id: {message_id!r} must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,127}}$ and not be async or validate"]
            )
        checked = check_request(self.json_body, endpoint="async")
        if not checked.valid:
            raise InvalidRequest(checked.errors)
        job, created = jobs.accept(request.user.name, checked, message_id, max_unfinished=request.user.max_unfinished)
        body: dict[str, Any] = {
            "message_id": job.message_id,
            "status": job.status,
            "message": "Request initiated successfully" if created else "Request already accepted",
        }
        if job.correlation_id is not None:
            body["correlation_id"] = job.correlation_id
        if checked.warnings:
            body["warnings"] = checked.warnings
        return Response(body, status=202 if created else 200, headers={"Location": f"/v1/messages/{job.message_id}"})


class ListParamsSerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=20)
    after_id = serializers.CharField(required=False)
    before_id = serializers.CharField(required=False)
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    correlation_id = serializers.CharField(required=False)
    model = serializers.CharField(required=False)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "after_id" in attrs and "before_id" in attrs:
            raise serializers.ValidationError("after_id and before_id cannot be used together")
        return attrs


class MessageListView(ApiView):
    @extend_schema(
        operation_id="messages_list",
        summary="List your messages, newest first",
        parameters=[
            ListParamsSerializer,
            # The statuses' own component, not an inline copy that generators make a second enum of.
            OpenApiParameter("status", {"$ref": "#/components/schemas/MessageStatusEnum"}, description="Only messages with this status."),
        ],
        responses={200: MessageListSerializer, 400: docs.ERROR_RESPONSES[400], **docs.ERRORS_AUTH},
        tags=["messages"],
    )
    def get(self, request: Request) -> Response:
        params = ListParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        filters = params.validated_data
        limit = filters["limit"]
        # A result can be megabytes: a page of a hundred never loads one (items omit it).
        jobs_qs = MessageJob.objects.filter(owner=request.user.name).defer("request", "secrets", "result")
        for name in ("status", "correlation_id", "model"):
            if name in filters:
                jobs_qs = jobs_qs.filter(**{name: filters[name]})
        if "created_after" in filters:
            jobs_qs = jobs_qs.filter(created_at__gt=filters["created_after"])
        if "created_before" in filters:
            jobs_qs = jobs_qs.filter(created_at__lt=filters["created_before"])

        if "before_id" in filters:
            cursor = self._cursor(request, filters["before_id"])
            newer = Q(created_at__gt=cursor.created_at) | Q(created_at=cursor.created_at, id__gt=cursor.id)
            page = list(jobs_qs.filter(newer).order_by("created_at", "id")[: limit + 1])
            has_more = len(page) > limit
            page = page[:limit][::-1]
        else:
            if "after_id" in filters:
                cursor = self._cursor(request, filters["after_id"])
                older = Q(created_at__lt=cursor.created_at) | Q(created_at=cursor.created_at, id__lt=cursor.id)
                jobs_qs = jobs_qs.filter(older)
            page = list(jobs_qs.order_by("-created_at", "-id")[: limit + 1])
            has_more = len(page) > limit
            page = page[:limit]
        return Response(
            {
                "data": [message_state(job, with_result=False) for job in page],
                "has_more": has_more,
                "first_id": page[0].message_id if page else None,
                "last_id": page[-1].message_id if page else None,
            }
        )

    @staticmethod
    def _cursor(request: Request, message_id: str) -> MessageJob:
        cursor = MessageJob.objects.filter(owner=request.user.name, message_id=message_id).only("id", "created_at").first()
        if cursor is None:
            raise InvalidRequest([f"after_id/before_id: no message with message_id {message_id!r}"])
        return cursor


class MessageDetailView(ApiView):
    @extend_schema(
        operation_id="messages_get",
        summary="A message's status and result",
        responses={200: MessageStateSerializer, 404: docs.ERROR_RESPONSES[404], **docs.ERRORS_AUTH},
        examples=docs.STATE_EXAMPLES,
        tags=["messages"],
    )
    def get(self, request: Request, message_id: str) -> Response:
        return Response(message_state(get_message(request, message_id)))


class CancelView(ApiView):
    @extend_schema(
        operation_id="messages_cancel",
        summary="Cancel a pending or processing message",
        description="A pending message never runs; a processing one stops within a second and keeps "
        "what it produced. Cancelling a cancelled message is 200 again; a completed, failed, "
        "errored or expired one is 409.",
        request=None,
        responses={
            200: MessageStateSerializer,
            404: docs.ERROR_RESPONSES[404],
            409: docs.ERROR_RESPONSES[409],
            **docs.ERRORS_AUTH,
        },
        tags=["messages"],
    )
    def post(self, request: Request, message_id: str) -> Response:
        job = jobs.cancel(get_message(request, message_id))
        return Response(message_state(job))


class ModelsView(ApiView):
    @extend_schema(
        operation_id="models_list",
        summary="The configured models",
        responses={200: ModelListSerializer, **docs.ERRORS_AUTH},
        tags=["models"],
    )
    def get(self, request: Request) -> Response:
        return Response(
            {
                "data": [
                    {"id": spec.id, "provider": spec.provider, "max_tokens": spec.max_tokens, "supports": sorted(spec.supports)}
                    for spec in catalog.models().values()
                ]
            }
        )


def healthz(request: HttpRequest) -> JsonResponse:
    """The process answers. No key, no database."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Database and broker reachable, and a worker seen recently; 503 otherwise."""
    from messaging.queue import shared_broker

    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        checks["broker"] = "ok" if shared_broker().ping() else "unavailable"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    if checks["database"] == "ok":
        recent = timezone.now() - timedelta(seconds=settings.MESSAGING_WORKER_STALE_SECONDS)
        seen = WorkerHeartbeat.objects.filter(seen_at__gte=recent).exists()
        checks["worker"] = "ok" if seen else "no worker seen recently"
    else:
        checks["worker"] = "unknown"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503)
