"""project.urls plus the baselines the API endpoints are measured against.

`POST /bench/bare` is the baseline: a plain Django function view. The two DRF views in between
tell the profile how much of the gap is DRF itself and how much the API key lookup.
"""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from project.urls import handler404, handler500, urlpatterns as project_urlpatterns

__all__ = ["handler404", "handler500", "urlpatterns"]


@csrf_exempt
@require_POST
def bare(request: HttpRequest) -> JsonResponse:
    # As little as a JSON endpoint can do: parse the body, answer JSON. No DRF, no auth, no
    # database; what is left is Django, its middleware and the server.
    json.loads(request.body)
    return JsonResponse({"ok": True})


class DRFView(APIView):
    """DRF with the project's parser and renderer, but no authentication."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        request.data  # noqa: B018 - parse the body, as the API views do
        return Response({"ok": True})


class DRFAuthView(APIView):
    """DRF with the project's defaults: the API key lookup on every request."""

    def post(self, request: Request) -> Response:
        request.data  # noqa: B018
        return Response({"ok": True})


urlpatterns = [
    path("bench/bare", bare, name="bench-bare"),
    path("bench/drf", DRFView.as_view(), name="bench-drf"),
    path("bench/drf-auth", DRFAuthView.as_view(), name="bench-drf-auth"),
    *project_urlpatterns,
]
