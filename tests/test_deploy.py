"""Safe by default in production: no public SECRET_KEY, the deployment checklist passes in the
README's production configuration, and every page carries the security headers.

Settings are read once at start-up from the environment, so start-up is tested in a
subprocess (`manage.py check`) with exactly the environment a deployment would have."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

ROOT = Path(__file__).resolve().parent.parent


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def production_environment() -> dict[str, str]:
    """The `export NAME=VALUE` lines of the README's production configuration, with a real key
    in place of its placeholder."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "export SECRET_KEY=" in b)
    env = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                env[name] = value
    assert env["SECRET_KEY"] == "...", "the README shows a placeholder, never a key"
    env["SECRET_KEY"] = secrets.token_urlsafe(50)
    return env


def test_the_readme_production_configuration_passes_the_deployment_checklist(tmp_path: Path) -> None:
    env = production_environment()
    assert env["HTTPS_ONLY"] == "true"

    result = manage({**env, "DATA_DIR": str(tmp_path)}, "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_without_https_only_the_checklist_names_what_is_missing(tmp_path: Path) -> None:
    env = {**production_environment(), "DATA_DIR": str(tmp_path)}
    del env["HTTPS_ONLY"]

    result = manage(env, "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


def test_a_missing_secret_key_stops_start_up_naming_it_and_how_to_set_it(tmp_path: Path) -> None:
    result = manage({"DATA_DIR": str(tmp_path)}, "check")

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: SECRET_KEY is not set.")
    assert "secrets.token_urlsafe(50)" in last_line


def test_an_empty_secret_key_is_a_missing_one(tmp_path: Path) -> None:
    result = manage({"DATA_DIR": str(tmp_path), "SECRET_KEY": ""}, "check")

    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_debug_runs_without_a_secret_key(tmp_path: Path) -> None:
    result = manage({"DATA_DIR": str(tmp_path), "DEBUG": "1"}, "check")

    assert result.returncode == 0, result.stderr


def test_a_malformed_proxy_header_stops_start_up(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path), "DEBUG": "1", "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto: https"}

    result = manage(env, "check")

    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER must be a header name" in result.stderr


@pytest.mark.parametrize("page", ["/admin/login/", "/v1/docs", "/v1/redoc", "/v1/models", "/healthz"])
def test_every_page_carries_the_security_headers(anonymous: APIClient, page: str, db: None) -> None:
    response = anonymous.get(page)

    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy
    assert "frame-ancestors 'none'" in policy
    assert "object-src 'none'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize("page", ["/admin/login/", "/v1/docs", "/v1/redoc"])
def test_the_admin_and_docs_pages_run_no_inline_script(anonymous: APIClient, page: str, db: None) -> None:
    """The policy allows this origin's script files only: an inline <script> would not run."""
    html = anonymous.get(page).content.decode()

    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts
    for attributes, body in scripts:
        assert "src=" in attributes and not body.strip(), (attributes, body[:200])


def test_swagger_ui_gets_its_set_up_script_from_the_service(anonymous: APIClient) -> None:
    html = anonymous.get("/v1/docs").content.decode()
    src = re.search(r'<script src="(/v1/docs\?[^"]*script[^"]*)"', html)
    assert src, html

    response = anonymous.get(src.group(1).replace("&amp;", "&"))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle" in response.content.decode()


@override_settings(SECURE_SSL_REDIRECT=True, SECURE_HSTS_SECONDS=3600, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_https_only_redirects_plain_http_but_not_the_health_checks(db: None) -> None:
    client = APIClient()  # after override_settings: the middleware reads them when it is built

    assert client.get("/v1/models").status_code == 301
    assert client.get("/v1/models")["Location"] == "https://testserver/v1/models"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # answered, not redirected
    secure = client.get("/healthz", HTTP_X_FORWARDED_PROTO="https")
    assert secure["Strict-Transport-Security"].startswith("max-age=3600")
