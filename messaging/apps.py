from __future__ import annotations

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    verbose_name = "Messaging"

    def ready(self) -> None:
        from messaging import schema, worker  # noqa: F401 - schema registers OpenAPI extensions

        worker.connect_signals()
        # A malformed models file stops start-up, not the first request that needs a model.
        from messaging import catalog

        catalog.models()
