from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView

from messaging import metrics, streaming, views

urlpatterns = [
    path("v1/messages/validate", views.ValidateView.as_view(), name="validate"),
    path("v1/messages/async", views.AsyncMessageView.as_view(), name="async"),
    # GET lists (a DRF view); POST runs a message synchronously (an async view).
    path("v1/messages", streaming.messages_root, name="messages"),
    path("v1/messages/<str:message_id>", views.MessageDetailView.as_view(), name="message"),
    path("v1/messages/<str:message_id>/stream", streaming.message_stream, name="stream"),
    path("v1/messages/<str:message_id>/cancel", views.CancelView.as_view(), name="cancel"),
    path("v1/models", views.ModelsView.as_view(), name="models"),
    path("v1/schema", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's set-up script from /v1/docs?script, not inline: the
    # Content-Security-Policy (settings.SECURE_CSP) runs no inline script.
    path("v1/docs", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="docs"),
    path("v1/redoc", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    # Prometheus; METRICS_TOKEN or loopback, no API key (messaging/metrics.py).
    path("metrics", metrics.scrape, name="metrics"),
]
