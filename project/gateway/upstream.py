"""Forwarding to an upstream OpenAI-compatible API (``settings.GATEWAY["UPSTREAM_URL"]``)
through the quota-aware client (``quotas.llm``): the provider's limits learned from its
headers and 429s, retries within a deadline, a circuit breaker, and (when the request says
``X-Quota-Degrade: allow``) the user's plan's degradation ladder.

Under ASGI a streamed chat is forwarded with the async client (``open_async_stream``): the
stream is opened on the event loop and its chunks are read there, holding no thread.

Every outcome becomes one HTTP answer here, in the app's vocabulary: the answer (streamed
or not, with ``X-Quota-Rung``), a 202 for a deferred job, a 429 with an exact
``Retry-After`` (the user's budget, or the provider's), a 503 (the provider's circuit is
open), or a 502 / 504 / the upstream's own 4xx for what the upstream did.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import weakref
from functools import lru_cache
from typing import Any

import openai
from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import HttpResponseBase, JsonResponse

from quotas import llm
from quotas.core.types import ceil_seconds
from quotas.exceptions import QuotaExceeded, RequestTooLarge
from quotas.http import error_body, error_payload, error_status
from quotas.llm.retries import provider_retry_after

__all__ = [
    "DEGRADE_HEADER",
    "RUNG_HEADER",
    "client_for_provider",
    "forward",
    "may_degrade",
    "open_async_stream",
    "open_stream_on_loop",
]

DEGRADE_HEADER = "X-Quota-Degrade"
RUNG_HEADER = "X-Quota-Rung"
UPSTREAM_TIMEOUT_SECONDS = 60.0
# What the SDK's create takes by name; other body fields travel in extra_body, as sent.
SDK_PARAMETERS = frozenset(
    inspect.signature(openai.resources.chat.Completions.create).parameters
) - {"self", "extra_headers", "extra_query", "extra_body", "timeout"}


def may_degrade(request: Any) -> bool:
    """Whether the client asked for the plan's ladder (``X-Quota-Degrade: allow``)."""
    return str(request.headers.get(DEGRADE_HEADER, "")).strip().lower() == "allow"


@lru_cache(maxsize=8)
def _sdk(base_url: str, api_key: str, timeout: float) -> openai.OpenAI:
    # One SDK client (one connection pool) per process and upstream.
    return openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout)


def client_for_provider(provider: str) -> openai.OpenAI:
    """The SDK client of the configured upstream (``QUOTAS["LLM_CLIENT_FACTORY"]``, for the
    deferred jobs the Celery worker runs)."""
    gateway = settings.GATEWAY
    timeout = float(gateway.get("UPSTREAM_TIMEOUT_SECONDS", UPSTREAM_TIMEOUT_SECONDS))
    return _sdk(gateway["UPSTREAM_URL"], gateway.get("UPSTREAM_API_KEY", ""), timeout)


# One AsyncOpenAI client (one connection pool) per event loop and upstream: its connections
# belong to the loop they were opened on.
_async_sdks: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str, float], openai.AsyncOpenAI]
] = weakref.WeakKeyDictionary()


def async_client_for_provider(provider: str) -> openai.AsyncOpenAI:
    """``client_for_provider``'s async twin, for the running event loop."""
    gateway = settings.GATEWAY
    timeout = float(gateway.get("UPSTREAM_TIMEOUT_SECONDS", UPSTREAM_TIMEOUT_SECONDS))
    key = (gateway["UPSTREAM_URL"], gateway.get("UPSTREAM_API_KEY", ""), timeout)
    clients = _async_sdks.setdefault(asyncio.get_running_loop(), {})
    if key not in clients:
        clients[key] = openai.AsyncOpenAI(
            base_url=key[0], api_key=key[1] or "none", timeout=timeout
        )
    return clients[key]


def forward(request: Any, body: dict[str, Any]) -> Any:
    """Call the upstream for ``request`` (a DRF request) with the sync client; the answer
    object or stream, or an HTTP response for every other outcome."""
    try:
        return _create(client_for_provider, request, body)
    except Exception as exc:
        answer = refusal_response(exc)
        if answer is None:
            raise
        return answer


def open_async_stream(request: Any, body: dict[str, Any]) -> Any:
    """``forward`` for a streamed chat under ASGI, called from the sync view's thread: the
    stream is opened with the async client on the request's event loop, and returned as an
    async stream (read there by the response's async generator), or an HTTP response.

    ``async_to_sync`` is used for the opening only, because the view is a sync DRF view and
    must return the response: its status and headers (429, 202, 502..., ``X-Quota-Rung``, the
    quota headers of the reservation that serves) depend on how the opening went, and are
    sent before the body. The view's thread waits meanwhile (the reservation, the provider's
    admission and the upstream's first answer, as the sync client would take); the quota
    steps of the async client run in this same thread (asgiref's thread-sensitive calls), and
    the stream itself, for its whole length, holds no thread. The opening runs on the
    request's own loop (asgiref hands it to the loop that called the view), where the stream
    is read afterwards.
    """
    return async_to_sync(open_stream_on_loop)(request, body)


async def open_stream_on_loop(request: Any, body: dict[str, Any]) -> Any:
    """``open_async_stream``'s coroutine, for a caller already on the request's event loop
    (the demo's pool wrapper, ``project.gateway.threads``: no thread waits for the opening)."""
    try:
        return await _create(async_client_for_provider, request, body)
    except Exception as exc:
        answer = refusal_response(exc)
        if answer is None:
            raise
        return answer


def _create(client_for: Any, request: Any, body: dict[str, Any]) -> Any:
    """``chat.completions.create`` on the quota-aware wrap of ``client_for(provider)``, the
    sync client or the async one (whose call is then awaited)."""
    provider = str(settings.GATEWAY.get("UPSTREAM_PROVIDER") or "upstream")
    client = llm.wrap(
        client_for(provider), request=request, provider=provider, degrade=may_degrade(request)
    )
    arguments, extra = _sdk_arguments(body)
    return client.chat.completions.create(**arguments, extra_body=extra or None)


def _sdk_arguments(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``create``'s named arguments and the rest of the body (sent as ``extra_body``)."""
    if body.get("stream"):  # the gateway's streams always end with the usage chunk
        body = {
            **body,
            "stream_options": {**(body.get("stream_options") or {}), "include_usage": True},
        }
    arguments = {k: v for k, v in body.items() if k in SDK_PARAMETERS}
    extra = {k: v for k, v in body.items() if k not in SDK_PARAMETERS}
    return arguments, extra


def refusal_response(exc: Exception) -> HttpResponseBase | None:
    """The HTTP answer of whatever the client raised (``None``: not one of ours)."""
    if isinstance(exc, llm.Deferred):
        return _deferred(exc)
    if isinstance(exc, QuotaExceeded | RequestTooLarge):
        response = JsonResponse(error_body(exc), status=error_status(exc))
        if isinstance(exc, QuotaExceeded):
            _retry_headers(response, exc.retry_after)
        return response
    if isinstance(exc, llm.ProviderUnavailable):
        response = _error(503, "provider_unavailable", str(exc), "api_error")
        _retry_headers(response, exc.retry_after)
        return response
    if isinstance(exc, openai.APIError):
        return _upstream_error(exc)
    return None


def _upstream_error(exc: openai.APIError) -> HttpResponseBase:
    if isinstance(exc, openai.APITimeoutError):
        return _error(504, "upstream_timeout", "The upstream API did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        return _error(502, "upstream_error", f"The upstream API could not be reached: {exc}.")
    status = getattr(exc, "status_code", 502)
    message = f"The upstream API answered HTTP {status}: {_message(exc)}"
    if status == 429:  # retries spent on the provider's own limit, within the deadline
        response = _error(429, "rate_limit_exceeded", message, "provider")
        _retry_headers(response, _retry_after_of(exc))
        return response
    # The upstream's own verdict on the request (400, 404, 422...) is passed on; the rest
    # is a bad gateway.
    return _error(status if 400 <= status < 500 else 502, "upstream_error", message)


def _deferred(exc: llm.Deferred) -> HttpResponseBase:
    body = {
        "id": exc.job_id,
        "object": "quota.deferred_job",
        "status": "queued",
        "retry_after_seconds": max(ceil_seconds(exc.retry_after), 1),
        "url": f"/quotas/jobs/{exc.job_id}/",
        "quota_rung": "deferred",
    }
    response = JsonResponse(body, status=202)
    response[RUNG_HEADER] = "deferred"
    _retry_headers(response, exc.retry_after)
    return response


def _error(status: int, code: str, message: str, kind: str = "api_error") -> JsonResponse:
    payload = error_payload(code, message)
    payload["error"]["type"] = kind
    return JsonResponse(payload, status=status)


def _retry_headers(response: HttpResponseBase, seconds: float) -> None:
    response["Retry-After"] = str(max(ceil_seconds(seconds), 1))
    response["retry-after-ms"] = str(max(math.ceil(seconds * 1000), 1))


def _message(exc: openai.APIError) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return str(getattr(exc, "message", exc))


def _retry_after_of(exc: openai.APIError) -> float:
    return provider_retry_after(exc) or 1.0
