"""Models configured in MESSAGING_MODELS_FILE, and GET /v1/models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from rest_framework.test import APIClient

from messaging import catalog
from messaging.serializers import check_request

VLLM = """
[models."llama-3.1-8b"]
provider = "openai"
base_url = "http://127.0.0.1:8001/v1"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
max_tokens = 8192
default_max_tokens = 512
supports = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"]

[models.gpt]
provider = "openai"
upstream_model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
max_tokens = 16384
"""


@pytest.fixture
def models_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "models.toml"
    path.write_text(VLLM)
    with override_settings(MESSAGING_MODELS_FILE=str(path)):
        catalog.models.cache_clear()
        yield path
    catalog.models.cache_clear()


def test_it_adds_the_files_models_to_the_built_in_ones(models_file: Path) -> None:
    models = catalog.models()

    assert list(models) == ["echo", "echo-slow", "llama-3.1-8b", "gpt"]
    llama = models["llama-3.1-8b"]
    assert (llama.provider, llama.max_tokens, llama.default_max_tokens) == ("openai", 8192, 512)
    assert llama.options["upstream_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    gpt = models["gpt"]
    assert gpt.options["base_url"] == "https://api.openai.com/v1"
    assert gpt.default_max_tokens == 1024
    assert gpt.supports == frozenset({"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"})


def test_it_lists_them_without_secrets(models_file: Path, alice: APIClient) -> None:
    body = alice.get("/v1/models").json()

    assert {
        "id": "gpt", "provider": "openai", "max_tokens": 16384,
        "supports": ["frequency_penalty", "presence_penalty", "seed", "temperature", "top_p"],
    } in body["data"]
    assert "OPENAI_API_KEY" not in str(body) and "127.0.0.1:8001" not in str(body)


def test_validation_knows_each_models_limit_and_what_it_ignores(models_file: Path) -> None:
    too_long = check_request({"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}, endpoint="validate")
    ignored = check_request({"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "min_p": 0.1, "top_p": 0.5}, endpoint="validate")

    assert too_long.errors == ["max_tokens: must be at most 8192, the limit of llama-3.1-8b"]
    assert ignored.warnings == ["gpt ignores min_p"]
    assert ignored.summary["model"] == "gpt" and ignored.summary["max_tokens"] == 1024


def test_a_model_may_bound_its_connections_to_the_upstream(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.vllm]\nprovider = 'openai'\nbase_url = 'http://127.0.0.1:8001/v1'\nmax_tokens = 8192\nmax_connections = 500\n")

    assert catalog.load_models_file(path)[0].options["max_connections"] == 500


def test_an_anthropic_model_loads_with_anthropics_api_as_its_default_base_url(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.claude]\nprovider = 'anthropic'\nmax_tokens = 8192\napi_key_env = 'ANTHROPIC_API_KEY'\n")

    with override_settings(MESSAGING_MODELS_FILE=str(path)):
        catalog.models.cache_clear()
        claude = catalog.models()["claude"]
    catalog.models.cache_clear()

    assert (claude.provider, claude.max_tokens, claude.default_max_tokens) == ("anthropic", 8192, 1024)
    assert claude.options["base_url"] == "https://api.anthropic.com"
    assert claude.options["upstream_model"] == "claude"
    assert claude.supports == frozenset({"temperature", "top_p", "top_k"})
    assert type(catalog.provider_for(claude)).__name__ == "AnthropicProvider"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[models.x\nprovider = 'openai'", "not valid TOML"),
        ("[models.x]\nprovider = 'bard'\nmax_tokens = 10", "provider must be one of echo, openai, anthropic, not 'bard'"),
        ("[models.x]\nprovider = 'openai'", "max_tokens (the model's limit) must be a positive integer"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\ndefault_max_tokens = 20", "default_max_tokens must be an integer from 1 to max_tokens (10)"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\napi_key = 'sk-123'", "keys do not belong in this file"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\napi_key_env = 'sk-live-123'", "api_key_env must be the NAME of an environment variable"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\ncolour = 'red'", "unknown keys ['colour']"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\nsupports = ['vibes']", "supports must list sampling fields"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\nbase_url = 'ftp://x'", "base_url must be an http(s) URL"),
        ("[models.echo]\nprovider = 'echo'\nmax_tokens = 10", "[models.echo] is already a model"),
        ("default = 'x'", "unknown top-level keys ['default']"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\nmax_tokens_field = 'tokens'", "max_tokens_field must be max_tokens or max_completion_tokens"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\nmax_connections = 0", "max_connections must be a positive integer"),
        ("[models.x]\nprovider = 'openai'\nmax_tokens = 10\nmax_attempts = true", "max_attempts must be a positive integer"),
    ],
)
def test_it_refuses_a_malformed_file_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)

    with override_settings(MESSAGING_MODELS_FILE=str(path)), pytest.raises(ImproperlyConfigured) as raised:
        catalog.models.cache_clear()
        catalog.models()
    catalog.models.cache_clear()

    assert str(path) in str(raised.value)
    assert problem in str(raised.value)


def test_a_malformed_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.x]\nprovider = 'bard'\nmax_tokens = 10\n")

    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin", "MESSAGING_MODELS_FILE": str(path), "DATA_DIR": str(tmp_path), "SECRET_KEY": "x" * 50},
        capture_output=True,
        text=True,
    )

    assert result.returncode != 0
    assert "provider must be one of echo, openai, anthropic, not 'bard'" in result.stderr


def test_the_default_model_must_be_configured() -> None:
    with override_settings(MESSAGING_DEFAULT_MODEL="gpt-5"), pytest.raises(ImproperlyConfigured, match="MESSAGING_DEFAULT_MODEL is 'gpt-5'"):
        catalog.models.cache_clear()
        catalog.models()
    catalog.models.cache_clear()
