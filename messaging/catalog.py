"""The configured models, and the provider that runs each.

`echo` and `echo-slow` are built in. More come from the TOML file MESSAGING_MODELS_FILE names:

    [models.gpt-4o-mini]
    provider = "openai"                      # echo, openai or anthropic
    base_url = "https://api.openai.com/v1"
    upstream_model = "gpt-4o-mini"           # default: the model's id
    api_key_env = "OPENAI_API_KEY"           # the NAME of the variable; never the key itself
    max_tokens = 16384                       # the model's limit
    default_max_tokens = 1024                # for requests with max_tokens: null
    supports = ["temperature", "top_p"]      # sampling fields it honours; others draw a warning
    connect_timeout = 10                     # seconds
    read_timeout = 60                        # seconds between bytes of a response
    max_attempts = 4                         # tries of one upstream call
    retry_deadline = 120                     # seconds for all of them
    max_connections = 500                    # to this upstream per worker process; default: no limit

The file is read once, at start-up (the app's ready()), so a malformed one stops the service
with a message naming the file and the problem.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# SAMPLING_FIELDS lives with the providers, which send only those a model supports; the request
# contract (serializers.py) reads it from here.
from messaging.providers.anthropic import AnthropicProvider
from messaging.providers.base import SAMPLING_FIELDS, ModelSpec, Provider
from messaging.providers.echo import EchoProvider
from messaging.providers.openai import OpenAIProvider

PROVIDERS = ("echo", "openai", "anthropic")
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
# What each provider's own API honours, for models whose entry does not say.
DEFAULT_SUPPORTS = {
    "echo": frozenset({"seed"}),  # deterministic: a seed is trivially honoured
    "openai": frozenset({"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"}),
    "anthropic": frozenset({"temperature", "top_p", "top_k"}),
}
_MODEL_KEYS = {
    "provider", "base_url", "upstream_model", "api_key_env", "max_tokens", "default_max_tokens",
    "supports", "connect_timeout", "read_timeout", "max_attempts", "retry_deadline", "delay",
    "max_tokens_field", "retry_base_delay", "retry_max_delay", "max_connections",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def builtin_models() -> list[ModelSpec]:
    return [
        ModelSpec(id="echo", provider="echo", max_tokens=8192, default_max_tokens=1024, supports=DEFAULT_SUPPORTS["echo"]),
        ModelSpec(
            id="echo-slow",
            provider="echo",
            max_tokens=8192,
            default_max_tokens=1024,
            supports=DEFAULT_SUPPORTS["echo"],
            options={"delay": settings.MESSAGING_ECHO_SLOW_DELAY},
        ),
    ]


def load_models_file(path: Path) -> list[ModelSpec]:
    """The models a TOML file configures; ImproperlyConfigured, naming the file, if malformed."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ImproperlyConfigured(f"MESSAGING_MODELS_FILE {path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ImproperlyConfigured(f"MESSAGING_MODELS_FILE {path}: not valid TOML: {exc}") from None
    unknown = set(document) - {"models"}
    if unknown:
        raise ImproperlyConfigured(f"MESSAGING_MODELS_FILE {path}: unknown top-level keys {sorted(unknown)}; models go in [models.<id>] tables")
    entries = document.get("models", {})
    if not isinstance(entries, dict):
        raise ImproperlyConfigured(f"MESSAGING_MODELS_FILE {path}: `models` must be tables, [models.<id>]")
    return [_model_spec(f"MESSAGING_MODELS_FILE {path}: [models.{model_id}]", model_id, entry) for model_id, entry in entries.items()]


def _model_spec(where: str, model_id: str, entry: Any) -> ModelSpec:
    def problem(message: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(f"{where}: {message}")

    if not isinstance(entry, dict):
        raise problem("must be a table")
    if "api_key" in entry:
        raise problem("keys do not belong in this file: put the key in an environment variable and name it in api_key_env")
    unknown = set(entry) - _MODEL_KEYS
    if unknown:
        raise problem(f"unknown keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}")
    provider = entry.get("provider")
    if provider not in PROVIDERS:
        raise problem(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if provider not in _providers():
        raise problem(f"the {provider} provider is not available in this version")
    max_tokens = entry.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise problem("max_tokens (the model's limit) must be a positive integer")
    default_max_tokens = entry.get("default_max_tokens", min(1024, max_tokens))
    if not isinstance(default_max_tokens, int) or not 1 <= default_max_tokens <= max_tokens:
        raise problem(f"default_max_tokens must be an integer from 1 to max_tokens ({max_tokens})")
    supports = entry.get("supports", DEFAULT_SUPPORTS[provider])
    if not isinstance(supports, (list, frozenset)) or not set(supports) <= set(SAMPLING_FIELDS):
        raise problem(f"supports must list sampling fields among {', '.join(SAMPLING_FIELDS)}")
    api_key_env = entry.get("api_key_env")
    if api_key_env is not None and (not isinstance(api_key_env, str) or not _ENV_NAME.match(api_key_env)):
        raise problem("api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key")
    for name in ("connect_timeout", "read_timeout", "retry_deadline", "delay", "retry_base_delay", "retry_max_delay"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise problem(f"{name} must be a number of seconds")
    if entry.get("max_tokens_field", "max_tokens") not in ("max_tokens", "max_completion_tokens"):
        raise problem("max_tokens_field must be max_tokens or max_completion_tokens")
    for name in ("max_attempts", "max_connections"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise problem(f"{name} must be a positive integer")

    options = {key: value for key, value in entry.items() if key not in {"provider", "max_tokens", "default_max_tokens", "supports"}}
    if provider != "echo":
        options.setdefault("base_url", DEFAULT_BASE_URLS[provider])
        options.setdefault("upstream_model", model_id)
        if not isinstance(options["base_url"], str) or not options["base_url"].startswith(("http://", "https://")):
            raise problem("base_url must be an http(s) URL")
    return ModelSpec(
        id=model_id,
        provider=provider,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        supports=frozenset(supports),
        options=options,
    )


@cache
def models() -> dict[str, ModelSpec]:
    catalog = {spec.id: spec for spec in builtin_models()}
    path = settings.MESSAGING_MODELS_FILE
    if path:
        for spec in load_models_file(Path(path)):
            if spec.id in catalog:
                raise ImproperlyConfigured(f"MESSAGING_MODELS_FILE {path}: [models.{spec.id}] is already a model")
            catalog[spec.id] = spec
    if settings.MESSAGING_DEFAULT_MODEL not in catalog:
        raise ImproperlyConfigured(
            f"MESSAGING_DEFAULT_MODEL is {settings.MESSAGING_DEFAULT_MODEL!r}, "
            f"which is not a configured model ({', '.join(catalog)})"
        )
    return catalog


def get_model(model_id: str | None) -> ModelSpec | None:
    """The model a request names; None (the request's null) is the default model."""
    return models().get(model_id or settings.MESSAGING_DEFAULT_MODEL)


def default_model_id() -> str:
    return str(settings.MESSAGING_DEFAULT_MODEL)


@cache
def _providers() -> dict[str, Provider]:
    return {"echo": EchoProvider(), "openai": OpenAIProvider(), "anthropic": AnthropicProvider()}


def provider_for(spec: ModelSpec) -> Provider:
    try:
        return _providers()[spec.provider]
    except KeyError:
        raise ImproperlyConfigured(f"the {spec.provider!r} provider of model {spec.id!r} is not available") from None
