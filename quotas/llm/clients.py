"""The SDK clients deferred jobs run with (``QUOTAS["LLM_CLIENT_FACTORY"]``): the caller's
client cannot travel with a job to the Celery worker, so the worker makes one by provider
name."""

from __future__ import annotations

import openai
from django.utils.module_loading import import_string

from quotas.conf import quota_settings

__all__ = ["client_for", "default_client"]


def default_client(provider: str) -> openai.OpenAI:
    """``openai.OpenAI()`` as its environment configures it (``OPENAI_API_KEY``,
    ``OPENAI_BASE_URL``), whatever the provider name."""
    return openai.OpenAI()


def client_for(provider: str) -> openai.OpenAI:
    """The client ``QUOTAS["LLM_CLIENT_FACTORY"]`` makes for ``provider``."""
    factory = import_string(quota_settings.LLM_CLIENT_FACTORY)
    return factory(provider)  # type: ignore[no-any-return]
