"""The project's settings, with a URLconf that adds the bare baseline view.

Only ROOT_URLCONF differs, so the bare view and the API run behind the same middleware,
database and gunicorn command.
"""

from __future__ import annotations

from project.settings import *  # noqa: F401,F403

ROOT_URLCONF = "bench.urls"
