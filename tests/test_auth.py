"""API keys: how they are sent, refused, created and stored, and whose messages they see."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.urls import URLPattern
from django.utils import timezone
from rest_framework.test import APIClient

from messaging import urls
from messaging.models import APIKey, MessageJob
from tests.conftest import VALID_REQUEST, client_for

PUBLIC_ROUTES = {"schema", "docs", "redoc"}
METHODS = ("get", "post", "put", "patch", "delete")
ASYNC_VIEW_METHODS = {"messages": ("get", "post"), "stream": ("get",)}


def api_endpoints() -> list[tuple[str, str]]:
    """(method, path) for every method of every /v1/ route, read from messaging/urls.py so a
    new endpoint is covered the day it is added."""
    endpoints = []
    for pattern in urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        route = str(pattern.pattern)
        if not route.startswith("v1/") or pattern.name in PUBLIC_ROUTES:
            continue
        url = "/" + route.replace("<str:message_id>", "msg_someone_elses")
        view_class = getattr(pattern.callback, "view_class", None)
        if view_class is None:
            # An async view (messaging.streaming): its methods are listed here, and a new one
            # fails this lookup until it is.
            methods = ASYNC_VIEW_METHODS[pattern.name]
        else:
            methods = tuple(method for method in METHODS if hasattr(view_class, method))
        endpoints.extend((method, url) for method in methods)
    return endpoints


ENDPOINTS = api_endpoints()

# The async views (streams, POST /v1/messages) read the database from executor threads, which
# cannot see a test's uncommitted transaction: these tests commit.
pytestmark = pytest.mark.django_db(transaction=True)


def test_the_endpoint_list_covers_the_api() -> None:
    assert {("post", "/v1/messages/validate"), ("post", "/v1/messages/async"), ("get", "/v1/messages"),
            ("get", "/v1/messages/msg_someone_elses"), ("post", "/v1/messages/msg_someone_elses/cancel"),
            ("get", "/v1/models"), ("post", "/v1/messages"),
            ("get", "/v1/messages/msg_someone_elses/stream")} <= set(ENDPOINTS)


def call(client: APIClient, method: str, url: str) -> Any:
    # A valid body: were the key check skipped, the request would succeed.
    return getattr(client, method)(url, VALID_REQUEST, format="json") if method == "post" else getattr(client, method)(url)


def assert_401(response: Any, message: str) -> None:
    assert response.status_code == 401, response.content
    assert response.json() == {"type": "error", "error": {"type": "authentication_error", "message": message}}
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


# --- Sending a key ------------------------------------------------------------------------------


def test_it_accepts_a_bearer_key(alice: APIClient) -> None:
    assert alice.get("/v1/models").status_code == 200


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_it_accepts_the_bearer_scheme_in_any_case(alice: APIClient, scheme: str) -> None:
    client = APIClient(HTTP_AUTHORIZATION=f"{scheme} {alice.api_key}")  # type: ignore[attr-defined]

    assert client.get("/v1/models").status_code == 200


def test_it_accepts_an_x_api_key_header(alice: APIClient) -> None:
    client = APIClient(HTTP_X_API_KEY=alice.api_key)  # type: ignore[attr-defined]

    assert client.get("/v1/models").status_code == 200


def test_both_headers_reach_the_same_owners_messages(alice: APIClient) -> None:
    message_id = alice.post("/v1/messages/async", VALID_REQUEST, format="json").json()["message_id"]
    other_key_of_alice = client_for("alice")
    by_header = APIClient(HTTP_X_API_KEY=other_key_of_alice.api_key)  # type: ignore[attr-defined]

    assert by_header.get(f"/v1/messages/{message_id}").json()["message_id"] == message_id


def test_health_needs_no_key(anonymous: APIClient) -> None:
    response = anonymous.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- Refusing a key, on every endpoint ---------------------------------------------------------

NO_KEY = "No API key: send Authorization: Bearer <key>, or x-api-key: <key>."
NOT_VALID = "The API key is not valid."
NOT_BEARER = 'The Authorization header must be "Bearer <key>".'


def no_key(key: str) -> APIClient:
    return APIClient()


def empty_headers(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION="", HTTP_X_API_KEY="")


def unknown_key(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION="Bearer sk-not-a-key-we-issued")


def wrong_secret(key: str) -> APIClient:
    # The right prefix with a wrong secret: the lookup finds the row, the hash must not match.
    prefix, _, secret = key.partition(".")
    return APIClient(HTTP_AUTHORIZATION=f"Bearer {prefix}.{secret[::-1]}")


def wrong_x_api_key(key: str) -> APIClient:
    return APIClient(HTTP_X_API_KEY=key + "x")


def token_scheme(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION=f"Token {key}")


def basic_scheme(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION="Basic YWxpY2U6c2VjcmV0")


def bare_key(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION=key)


def bearer_without_key(key: str) -> APIClient:
    return APIClient(HTTP_AUTHORIZATION="Bearer ")


REFUSALS = {
    no_key: NO_KEY,
    empty_headers: NO_KEY,
    unknown_key: NOT_VALID,
    wrong_secret: NOT_VALID,
    wrong_x_api_key: NOT_VALID,
    token_scheme: NOT_BEARER,
    basic_scheme: NOT_BEARER,
    bare_key: NOT_BEARER,
    bearer_without_key: NOT_BEARER,
}


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
@pytest.mark.parametrize("client_with", REFUSALS, ids=lambda f: f.__name__)
def test_it_refuses_a_missing_wrong_or_malformed_key(alice: APIClient, client_with: Any, method: str, url: str) -> None:
    response = call(client_with(alice.api_key), method, url)  # type: ignore[attr-defined]

    assert_401(response, REFUSALS[client_with])
    assert MessageJob.objects.count() == 0


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_it_refuses_a_revoked_key(alice: APIClient, method: str, url: str) -> None:
    APIKey.objects.filter(owner="alice").update(revoked=True)

    assert_401(call(alice, method, url), NOT_VALID)
    assert MessageJob.objects.count() == 0


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_it_refuses_an_expired_key(alice: APIClient, method: str, url: str) -> None:
    APIKey.objects.filter(owner="alice").update(expiry_date=timezone.now() - timedelta(seconds=1))

    assert_401(call(alice, method, url), "The API key has expired.")
    assert MessageJob.objects.count() == 0


def test_it_accepts_a_key_that_expires_later(alice: APIClient) -> None:
    APIKey.objects.filter(owner="alice").update(expiry_date=timezone.now() + timedelta(days=1))

    assert alice.get("/v1/models").status_code == 200


def test_revoking_one_key_leaves_the_owners_other_keys_working(alice: APIClient) -> None:
    second = client_for("alice")
    first_key = APIKey.objects.get_from_key(alice.api_key)  # type: ignore[attr-defined]
    APIKey.objects.filter(pk=first_key.pk).update(revoked=True)

    assert alice.get("/v1/models").status_code == 401
    assert second.get("/v1/models").status_code == 200


# --- Creating keys ------------------------------------------------------------------------------


def create_api_key(*args: str) -> str:
    out = StringIO()
    call_command("create_api_key", *args, stdout=out)
    return out.getvalue()


def test_create_api_key_prints_a_working_key_alone_on_its_last_line(db: None) -> None:
    output = create_api_key("--owner", "carol")

    key = output.rstrip("\n").splitlines()[-1]
    assert key == key.strip() and " " not in key
    client = APIClient(HTTP_AUTHORIZATION=f"Bearer {key}")
    message_id = client.post("/v1/messages/async", VALID_REQUEST, format="json").json()["message_id"]
    assert MessageJob.objects.get(message_id=message_id).owner == "carol"


def test_create_api_key_stores_the_key_hashed(db: None) -> None:
    key = create_api_key("--owner", "carol", "--name", "ci").splitlines()[-1]

    row = APIKey.objects.get(owner="carol")
    assert row.name == "ci"
    _, _, secret = key.partition(".")
    stored = " ".join(str(getattr(row, field.attname)) for field in APIKey._meta.concrete_fields)
    assert key not in stored
    assert secret not in stored
    assert row.hashed_key and row.hashed_key != key


@pytest.mark.parametrize("owner", ["", "   "])
def test_create_api_key_refuses_an_empty_owner(db: None, owner: str) -> None:
    with pytest.raises((CommandError, SystemExit)):
        create_api_key("--owner", owner)

    assert APIKey.objects.count() == 0


def test_create_api_key_requires_an_owner(db: None) -> None:
    with pytest.raises((CommandError, SystemExit)):
        create_api_key()

    assert APIKey.objects.count() == 0


# --- Whose messages ---------------------------------------------------------------------------


def test_another_owners_message_is_404_exactly_like_a_missing_one(alice: APIClient, bob: APIClient) -> None:
    message_id = alice.post("/v1/messages/async", VALID_REQUEST, format="json").json()["message_id"]

    for method, url in [("get", f"/v1/messages/{message_id}"), ("post", f"/v1/messages/{message_id}/cancel")]:
        theirs = getattr(bob, method)(url)
        missing = getattr(bob, method)(url.replace(message_id, "msg_missing"))
        assert theirs.status_code == 404
        assert theirs.json()["error"]["type"] == "not_found_error"
        assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace("msg_missing", message_id)

    assert MessageJob.objects.get(message_id=message_id).status == "pending"
    assert alice.get(f"/v1/messages/{message_id}").status_code == 200


def test_an_owner_lists_only_their_own_messages(alice: APIClient, bob: APIClient) -> None:
    alices = alice.post("/v1/messages/async", VALID_REQUEST, format="json").json()["message_id"]
    bobs = bob.post("/v1/messages/async", VALID_REQUEST, format="json").json()["message_id"]

    assert [m["message_id"] for m in alice.get("/v1/messages").json()["data"]] == [alices]
    assert [m["message_id"] for m in bob.get("/v1/messages").json()["data"]] == [bobs]
