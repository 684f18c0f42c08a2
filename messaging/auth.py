"""API key authentication: `Authorization: Bearer <key>` or `x-api-key: <key>`."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from messaging.models import APIKey


@dataclass(frozen=True)
class Owner:
    """The caller, as DRF's `request.user`: whoever owns the key."""

    name: str
    is_authenticated: bool = True


def key_from_headers(request: Request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.META.get("HTTP_X_API_KEY") or None


class APIKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Owner, APIKey] | None:
        key = key_from_headers(request)
        if key is None:
            return None  # IsAuthenticated then answers 401 "no key"
        try:
            api_key = APIKey.objects.get_from_key(key)
        except APIKey.DoesNotExist:
            raise exceptions.AuthenticationFailed("The API key is not valid.") from None
        if api_key.has_expired:
            raise exceptions.AuthenticationFailed("The API key has expired.")
        return Owner(api_key.owner), api_key

    def authenticate_header(self, request: Request) -> str:
        # Its presence makes DRF answer 401 rather than 403 for a missing key.
        return 'Bearer realm="api"'
