"""The exact-match response cache: answers kept in Redis for ``LLM_CACHE_SECONDS``, keyed by
the normalised request, served as a degradation rung when the models above refuse.

Normalised: the JSON of the request with sorted keys, without what does not change the
answer's content (``stream``, ``stream_options``, ``user``, ``metadata``, ``store``,
``service_tier``) and with the *requested* model, so an answer a cheaper rung gave is found
again for the same request. Every request is matched exactly, sampled ones too
(``temperature`` > 0): a plan that caches accepts a repeated answer in place of a refusal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from quotas.conf import quota_settings
from quotas.engine.runtime import get_store, guarded, redis_key_prefix
from quotas.exceptions import StoreUnavailable

__all__ = ["cache_key", "cached_response", "keep_response"]

# Request fields that change how an answer is delivered or billed, not what it says.
DELIVERY_FIELDS = frozenset(
    ("stream", "stream_options", "user", "metadata", "store", "service_tier", "timeout")
)


def cache_key(request: Mapping[str, Any]) -> str:
    """The Redis key of a request's cached answer (a SHA-256 of its normalised JSON)."""
    kept = {k: v for k, v in request.items() if k not in DELIVERY_FIELDS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return f"{redis_key_prefix()}:cache:{hashlib.sha256(text.encode()).hexdigest()}"


def cached_response(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The answer kept for this request, or ``None`` (none, or Redis unavailable)."""
    try:
        raw = guarded(_get, cache_key(request))
    except StoreUnavailable:
        return None
    if raw is None:
        return None
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def keep_response(request: Mapping[str, Any], response: Mapping[str, Any]) -> bool:
    """Keep an answer for ``LLM_CACHE_SECONDS``; whether it was kept (Redis may be down)."""
    text = json.dumps(response, separators=(",", ":"), default=str)
    try:
        guarded(_set, cache_key(request), text, int(quota_settings.LLM_CACHE_SECONDS))
    except StoreUnavailable:
        return False
    return True


def _get(key: str) -> Any:
    try:
        return get_store().client.get(key)
    except RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from exc


def _set(key: str, text: str, seconds: int) -> None:
    try:
        get_store().client.set(key, text, ex=seconds)
    except RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from exc
