from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from messaging import webhooks
from messaging.models import WebhookEndpoint


class Command(BaseCommand):
    help = (
        "Register a webhook endpoint for an owner: it receives a signed event whenever one of the "
        "owner's messages finishes. The signing secret is printed once, alone on the last line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="Whose messages it is told about.")
        parser.add_argument("--url", required=True, help="An http(s) URL the outbound policy allows.")
        parser.add_argument("--description", default="", help="A label for the admin.")

    def handle(self, *args: Any, owner: str, url: str, description: str, **options: Any) -> None:
        owner = owner.strip()
        if not owner:
            self.stderr.write("--owner must not be empty")
            raise SystemExit(2)
        problem = webhooks.url_problem(url)
        if problem:
            self.stderr.write(f"--url {problem}")
            raise SystemExit(2)
        endpoint = WebhookEndpoint.objects.create(owner=owner, url=url, description=description)
        self.stdout.write(f"Created webhook endpoint {endpoint.pk} for owner {owner!r}: {url}. Its signing secret is shown only now:")
        self.stdout.write(endpoint.secret)
