from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from messaging.models import APIKey


class Command(BaseCommand):
    help = "Create an API key for an owner. The key is printed once, alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="Who the key's messages belong to.")
        parser.add_argument("--name", default="", help="A label for the key (default: the owner).")

    def handle(self, *args: Any, owner: str, name: str, **options: Any) -> None:
        owner = owner.strip()
        if not owner:
            self.stderr.write("--owner must not be empty")
            raise SystemExit(2)
        api_key, key = APIKey.objects.create_key(name=name or owner, owner=owner)
        self.stdout.write(f"Created API key {api_key.prefix}… for owner {owner!r}. It is shown only now:")
        self.stdout.write(key)
