from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from messaging import maintenance
from messaging.models import MessageEvent


class Command(BaseCommand):
    help = (
        "Delete finished messages older than MESSAGING_RETENTION_DAYS with their events, in short "
        "transactions (the service's schedule does this every minute)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only count what would be deleted.")

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        cutoff = maintenance.retention_cutoff()
        when = f"finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC ({settings.MESSAGING_RETENTION_DAYS:g} days)"
        if dry_run:
            messages = maintenance.purgeable().count()  # type: ignore[attr-defined]
            events = MessageEvent.objects.filter(job__in=maintenance.purgeable()).count()
            self.stdout.write(f"Would delete {messages} messages {when}, with {events} events.")
            return
        purged = maintenance.purge(budget=float("inf"))
        self.stdout.write(f"Deleted {purged.messages} messages {when}, with {purged.events} events.")
