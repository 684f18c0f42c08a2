from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from messaging import errors

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("messaging.urls")),
]

# Anything under /v1/ that Django itself answers (no route, a crash) still speaks the API's
# error shape; the admin keeps Django's pages.
handler404 = errors.page_not_found
handler500 = errors.server_error
