"""The provider side: a quota-aware client around the official ``openai`` SDK.

    from quotas import llm

    client = llm.wrap(OpenAI(), user=request.user)            # or AsyncOpenAI()
    answer = client.chat.completions.create(model="gpt-4o", messages=[...], max_tokens=200)

``create`` takes and returns what the SDK's does. Per call it reserves the user's budget,
holds back (or refuses) while the provider's shared state says the provider would refuse,
retries 429s, 5xx, timeouts and connection errors within a deadline, settles with the
answer's ``usage`` (streams: when they end or are closed) and refunds a failed call. With
``degrade=True`` (per client or per call) the user's plan's ladder serves when the
requested model refuses: cheaper models, the response cache, a deferred job
(``Deferred``). ``answer.quota_rung`` says which rung served (``"preferred"``,
``"fallback"``, ``"cache"``).

``track`` / ``atrack`` do the quota part around any other SDK's call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import openai

from quotas.llm.aclient import AsyncQuotaClient
from quotas.llm.calls import CallOptions
from quotas.llm.client import QuotaClient
from quotas.llm.errors import Deferred, ProviderRefused, ProviderUnavailable
from quotas.llm.track import TrackedUsage, atrack, track

__all__ = [
    "AsyncQuotaClient",
    "Deferred",
    "ProviderRefused",
    "ProviderUnavailable",
    "QuotaClient",
    "TrackedUsage",
    "atrack",
    "provider_name",
    "track",
    "wrap",
]


def provider_name(client: Any) -> str:
    """The name a client's provider key is known by: its API host and a short hash of its
    key (``api.openai.com/3f9a1c2e``), never the key itself."""
    url = client.base_url
    host = f"{url.host}:{url.port}" if url.port else str(url.host)
    digest = hashlib.sha256(str(client.api_key or "").encode()).hexdigest()[:8]
    return f"{host}/{digest}"


def wrap(
    client: Any,
    *,
    user: Any = None,
    request: Any = None,
    provider: str | None = None,
    degrade: bool = False,
    deadline: float | None = None,
) -> QuotaClient | AsyncQuotaClient:
    """A quota-aware ``client`` (``openai.OpenAI`` or ``openai.AsyncOpenAI``) for ``user``.

    ``request``: the Django or DRF request being served (its user is the default ``user``):
    the first call uses the reservation the quota throttle made for it, and the quota
    middleware's headers tell the budget of the reservation that served it. ``provider``:
    the name the provider's shared state is kept under (default: ``provider_name``).
    ``degrade``: let the plan's ladder serve (each call can say otherwise). ``deadline``:
    seconds one call may take in all (default ``QUOTAS["LLM_DEADLINE_SECONDS"]``).
    """
    if user is None and request is not None:
        user = request.user
    if user is None:
        raise TypeError("wrap() needs the user the calls are made for (user= or request=).")
    if not hasattr(client, "chat") or not hasattr(client, "with_options"):
        raise TypeError(
            f"wrap() takes an openai.OpenAI or openai.AsyncOpenAI client, not {client!r}; "
            "use quotas.llm.track() around other SDKs."
        )
    options = CallOptions(
        user=user,
        provider=provider or provider_name(client),
        degrade=degrade,
        deadline_seconds=deadline,
        request=request,
    )
    if isinstance(client, openai.AsyncOpenAI):
        return AsyncQuotaClient(client, options)
    return QuotaClient(client, options)
