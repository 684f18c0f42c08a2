"""Plain fixtures, built the same way in every test: two owners with a key each."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from messaging.models import APIKey

VALID_REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello there, echo"}]}

# For tests that run a message in-process (runner.run_one): the runner reaches the database from
# threads of its own, whose connections see only committed rows. Inside a test's transaction
# they would find nothing.
RUNS_THE_WORKER = pytest.mark.django_db(transaction=True)


def client_for(owner: str) -> APIClient:
    _, key = APIKey.objects.create_key(name=owner, owner=owner)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    client.api_key = key  # type: ignore[attr-defined]
    return client


@pytest.fixture
def alice(db: None) -> APIClient:
    return client_for("alice")


@pytest.fixture
def bob(db: None) -> APIClient:
    return client_for("bob")


@pytest.fixture
def anonymous() -> APIClient:
    return APIClient()

# Process fixtures (start_cluster, start_server, broker) for the end-to-end tests.
pytest_plugins = ["tests.processes"]
