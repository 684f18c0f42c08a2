from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

application = get_asgi_application()

from messaging.parsers import BodyLimit  # noqa: E402 (needs the settings get_asgi_application set up)

# Django's ASGI handler would spool a whole request body, however large, before any view runs.
application = BodyLimit(application)
