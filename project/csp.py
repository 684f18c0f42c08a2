"""A Content-Security-Policy header on every response, from `settings.SECURE_CSP`.

Django 5.2 has no CSP of its own; Django 6.0's ContentSecurityPolicyMiddleware reads a
`SECURE_CSP` dict of the same shape, so moving to it is a change of one MIDDLEWARE line. A
dozen lines of our own rather than the django-csp package: the policy is fixed, and every page
we serve (the admin, Swagger UI, Redoc) runs without inline scripts, so nonces are not needed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Union

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

Handler = Callable[[HttpRequest], Union[HttpResponseBase, Awaitable[HttpResponseBase]]]


def build_policy(directives: dict[str, list[str]]) -> str:
    return "; ".join(" ".join([name, *sources]) for name, sources in directives.items())


class ContentSecurityPolicyMiddleware:
    # Both kinds, like RequestIDMiddleware: a sync-only middleware would put every async
    # request (streams, the synchronous endpoint) through a thread hop.
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Handler):
        self.get_response = get_response
        self.policy = build_policy(settings.SECURE_CSP)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._add_header(self.get_response(request))  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        return self._add_header(await self.get_response(request))  # type: ignore[misc]

    def _add_header(self, response: HttpResponseBase) -> HttpResponseBase:
        # A view that needs another policy sets its own header.
        if self.policy:
            response.headers.setdefault("Content-Security-Policy", self.policy)
        return response
