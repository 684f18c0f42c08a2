from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from messaging.models import APIKey


class Command(BaseCommand):
    help = "Create an API key for an owner. The key is printed once, alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="Who the key's messages belong to.")
        parser.add_argument("--name", default="", help="A label for the key (default: the owner).")
        parser.add_argument(
            "--key-file",
            type=Path,
            help="For development (scripts/serve): keep the key in this file, readable by its "
            "owner only, and print the one it holds while that is still a valid, unrevoked key "
            "of this owner instead of creating another.",
        )

    def handle(self, *args: Any, owner: str, name: str, key_file: Path | None, **options: Any) -> None:
        owner = owner.strip()
        if not owner:
            self.stderr.write("--owner must not be empty")
            raise SystemExit(2)
        if key_file is not None:
            kept = _kept_key(key_file, owner)
            if kept is not None:
                self.stdout.write(f"Reusing API key {kept.partition('.')[0]}… for owner {owner!r}, kept in {key_file}:")
                self.stdout.write(kept)
                return
        api_key, key = APIKey.objects.create_key(name=name or owner, owner=owner)
        if key_file is not None:
            _keep(key_file, key)
            self.stdout.write(f"Created API key {api_key.prefix}… for owner {owner!r}, kept in {key_file}:")
        else:
            self.stdout.write(f"Created API key {api_key.prefix}… for owner {owner!r}. It is shown only now:")
        self.stdout.write(key)


def _kept_key(path: Path, owner: str) -> str | None:
    """The key in `path` if it still works for `owner`: keys are stored hashed, so the file is
    the only place the plaintext lives."""
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        api_key = APIKey.objects.get_from_key(key)  # unrevoked, and the hash matches
    except APIKey.DoesNotExist:
        return None
    if api_key.owner != owner or api_key.has_expired:
        return None
    return key


def _keep(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(descriptor, 0o600)  # also when the file was already there with another mode
        file.write(key + "\n")
    os.replace(temporary, path)
