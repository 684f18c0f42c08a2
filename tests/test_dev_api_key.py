"""`create_api_key --key-file`: the one development key scripts/serve keeps and reuses, rather
than a new key at every start."""

from __future__ import annotations

import io
import stat
from pathlib import Path

from django.core.management import call_command
from django.utils import timezone

from messaging.models import APIKey


def create_api_key(*args: str) -> str:
    out = io.StringIO()
    call_command("create_api_key", *args, stdout=out)
    return out.getvalue().splitlines()[-1]


def test_it_keeps_the_key_in_a_file_only_its_user_can_read(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"

    key = create_api_key("--owner", "dev", "--key-file", str(path))

    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert APIKey.objects.is_valid(key)


def test_it_reuses_the_kept_key_while_it_is_valid(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"
    first = create_api_key("--owner", "dev", "--key-file", str(path))

    second = create_api_key("--owner", "dev", "--key-file", str(path))

    assert second == first
    assert APIKey.objects.filter(owner="dev").count() == 1


def test_a_revoked_kept_key_is_replaced(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"
    first = create_api_key("--owner", "dev", "--key-file", str(path))
    APIKey.objects.filter(owner="dev").update(revoked=True)

    second = create_api_key("--owner", "dev", "--key-file", str(path))

    assert second != first
    assert APIKey.objects.is_valid(second)
    assert path.read_text().strip() == second


def test_an_expired_kept_key_is_replaced(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"
    first = create_api_key("--owner", "dev", "--key-file", str(path))
    APIKey.objects.filter(owner="dev").update(expiry_date=timezone.now() - timezone.timedelta(minutes=1))

    assert create_api_key("--owner", "dev", "--key-file", str(path)) != first


def test_a_key_of_another_owner_or_a_deleted_one_is_replaced(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"
    alice = create_api_key("--owner", "alice", "--key-file", str(path))

    dev = create_api_key("--owner", "dev", "--key-file", str(path))
    assert dev != alice
    APIKey.objects.all().delete()

    assert create_api_key("--owner", "dev", "--key-file", str(path)) != dev


def test_a_garbled_file_is_replaced_and_its_mode_tightened(db: None, tmp_path: Path) -> None:
    path = tmp_path / "dev_api_key"
    path.write_text("not a key\n")
    path.chmod(0o644)

    key = create_api_key("--owner", "dev", "--key-file", str(path))

    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
