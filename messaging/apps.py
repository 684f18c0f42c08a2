from __future__ import annotations

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    verbose_name = "Messaging"

    def ready(self) -> None:
        from django_q.signals import post_spawn

        from messaging import runner, schema  # noqa: F401 - schema registers OpenAPI extensions

        # Each worker process starts its runner once forked (and when a dead one is replaced):
        # heartbeat, leases and claims from the start, before any token arrives.
        post_spawn.connect(runner.on_worker_spawn, dispatch_uid="messaging.runner")
        # Expiry and retention run every minute from a schedule that `migrate` installs.
        from django.db.models.signals import post_migrate

        from messaging import maintenance

        post_migrate.connect(maintenance.install_schedule, sender=self, dispatch_uid="messaging.maintenance")
        # A malformed models file stops start-up, not the first request that needs a model.
        from messaging import catalog

        catalog.models()
