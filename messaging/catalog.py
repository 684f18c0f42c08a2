"""The configured models, and the provider that runs each."""

from __future__ import annotations

from functools import cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from messaging.providers.base import ModelSpec, Provider

# Request fields that tune sampling. A model lists the ones it honours in `supports`; the
# others draw a validation warning naming them.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


@cache
def models() -> dict[str, ModelSpec]:
    # `echo` is deterministic, so `seed` is trivially honoured; it ignores the other
    # sampling fields.
    echo_supports = frozenset({"seed"})
    builtin = [
        ModelSpec(id="echo", provider="echo", max_tokens=8192, default_max_tokens=1024, supports=echo_supports),
        ModelSpec(
            id="echo-slow",
            provider="echo",
            max_tokens=8192,
            default_max_tokens=1024,
            supports=echo_supports,
            options={"delay": settings.MESSAGING_ECHO_SLOW_DELAY},
        ),
    ]
    catalog = {spec.id: spec for spec in builtin}
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
    from messaging.providers.echo import EchoProvider

    return {"echo": EchoProvider()}


def provider_for(spec: ModelSpec) -> Provider:
    return _providers()[spec.provider]
