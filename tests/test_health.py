"""GET /healthz and GET /readyz: no key needed."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework.test import APIClient

from messaging.models import WorkerHeartbeat


def test_healthz_answers_without_a_key(anonymous: APIClient) -> None:
    response = anonymous.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_503_when_no_worker_was_seen_recently(anonymous: APIClient, db: None) -> None:
    WorkerHeartbeat.objects.create(name="old:1", seen_at=timezone.now() - timedelta(minutes=5))

    response = anonymous.get("/readyz")

    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "checks": {"database": "ok", "broker": "ok", "worker": "no worker seen recently"},
    }


def test_readyz_is_200_with_database_broker_and_a_recent_worker(anonymous: APIClient, db: None) -> None:
    WorkerHeartbeat.objects.create(name="host:1", seen_at=timezone.now())

    response = anonymous.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "worker": "ok"}}
