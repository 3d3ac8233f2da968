"""HTTP pieces shared by the DRF throttle and the middleware: headers and error bodies.

Header families (``QUOTAS["HEADERS"]``):
- ``seed``:   ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (tokens;
              reset in whole seconds).
- ``openai``: ``x-ratelimit-limit-tokens``, ``x-ratelimit-remaining-tokens``,
              ``x-ratelimit-reset-tokens`` (a duration like ``6m0s``), and the ``-requests``
              variants when a requests-per-minute limit applies.
- ``ietf``:   ``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers).
Rejections add ``Retry-After`` (whole seconds, rounded up: never early) and
``retry-after-ms``. While Redis is unavailable only the limit is known: remaining and reset
are left out (not guessed) and ``X-Quota-Degraded: redis-unavailable`` says why.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from quotas import services
from quotas.conf import quota_settings
from quotas.core.types import PolicyState, QuotaState, ceil_seconds
from quotas.exceptions import QuotaExceeded, RequestTooLarge

__all__ = [
    "CHUNKED_BODY_MESSAGE",
    "authentication_challenge",
    "client_address",
    "error_body",
    "error_payload",
    "error_status",
    "quota_headers",
    "set_headers",
    "simple_error",
]

DEGRADED_HEADER = "X-Quota-Degraded"


def duration(seconds: float) -> str:
    """OpenAI's duration style: ``20ms``, ``1s``, ``6m0s``, ``1h0m0s`` (never rounded down)."""
    if 0 < seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = ceil_seconds(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def quota_headers(state: QuotaState) -> dict[str, str]:
    """Every header the configured families give for one decision."""
    families = set(quota_settings.HEADERS)
    headers: dict[str, str] = {}
    remaining, reset = max(state.remaining, 0), ceil_seconds(state.reset_seconds)
    window = ceil_seconds(state.window_seconds)
    if state.degraded:
        headers[DEGRADED_HEADER] = "redis-unavailable"
    if "seed" in families:
        headers["X-RateLimit-Limit"] = str(state.limit)
        if not state.degraded:
            headers["X-RateLimit-Remaining"] = str(remaining)
            headers["X-RateLimit-Reset"] = str(reset)
    if "openai" in families:
        headers.update(_openai_headers(state, remaining))
    if "ietf" in families:
        headers.update(_ietf_headers(state, remaining, reset, window))
    if state.retry_after > 0:
        headers["Retry-After"] = str(max(ceil_seconds(state.retry_after), 1))
        headers["retry-after-ms"] = str(math.ceil(state.retry_after * 1000))
    return headers


def _openai_headers(state: QuotaState, remaining: int) -> dict[str, str]:
    headers = {"x-ratelimit-limit-tokens": str(state.limit)}
    if not state.degraded:
        headers["x-ratelimit-remaining-tokens"] = str(remaining)
        headers["x-ratelimit-reset-tokens"] = duration(state.reset_seconds)
    if state.requests_limit:
        headers["x-ratelimit-limit-requests"] = str(state.requests_limit)
        if not state.degraded:
            headers["x-ratelimit-remaining-requests"] = str(max(state.requests_remaining, 0))
            headers["x-ratelimit-reset-requests"] = duration(state.requests_reset_seconds)
    return headers


def _ietf_headers(state: QuotaState, remaining: int, reset: int, window: int) -> dict[str, str]:
    """``RateLimit-Policy`` lists every limit that applied; ``RateLimit`` the binding one of
    each metric (the one with the least left)."""
    if not state.policies:  # degraded: only the plan's own limits are known
        return _ietf_plan_headers(state, remaining, reset, window)
    listed = [f'"{_name(p.name)}";q={p.limit};w={p.window_seconds}' for p in state.policies]
    headers = {"RateLimit-Policy": ", ".join(listed)}
    if not state.degraded:
        binding = [
            f'"{_name(p.name)}";r={max(p.remaining, 0)};t={ceil_seconds(p.reset_seconds)}'
            for p in _binding(state.policies)
        ]
        headers["RateLimit"] = ", ".join(binding)
    return headers


def _binding(policies: tuple[PolicyState, ...]) -> list[PolicyState]:
    tightest: dict[str, PolicyState] = {}
    for policy in policies:
        best = tightest.get(policy.metric)
        if best is None or (policy.remaining, -policy.reset_seconds) < (
            best.remaining,
            -best.reset_seconds,
        ):
            tightest[policy.metric] = policy
    return list(tightest.values())


def _name(name: str) -> str:
    """A policy name as a structured-field string (no quote, backslash or control)."""
    return "".join(ch for ch in name if 32 <= ord(ch) < 127 and ch not in '"\\')


def _ietf_plan_headers(
    state: QuotaState, remaining: int, reset: int, window: int
) -> dict[str, str]:
    policies = [f'"tokens";q={state.limit};w={window}']
    if state.requests_limit:
        policies.append(f'"requests";q={state.requests_limit};w=60')
    headers = {"RateLimit-Policy": ", ".join(policies)}
    if not state.degraded:
        limits = [f'"tokens";r={remaining};t={reset}']
        if state.requests_limit:
            requests_reset = ceil_seconds(state.requests_reset_seconds)
            requests_left = max(state.requests_remaining, 0)
            limits.append(f'"requests";r={requests_left};t={requests_reset}')
        headers["RateLimit"] = ", ".join(limits)
    return headers


def set_headers(response: HttpResponseBase, state: QuotaState) -> None:
    for name, value in quota_headers(state).items():
        response[name] = value


def error_status(exc: QuotaExceeded | RequestTooLarge) -> int:
    return 413 if isinstance(exc, RequestTooLarge) else 429


def error_body(exc: QuotaExceeded | RequestTooLarge) -> dict[str, Any]:
    """The JSON body of a 429 or 413: a DRF-style ``detail`` and the OpenAI ``error`` object
    (the shape the official ``openai`` client parses)."""
    message = str(exc)
    which = {"scope": exc.limit_scope, "window": exc.window, "model": exc.model}
    if isinstance(exc, RequestTooLarge):
        error = {
            "code": "request_too_large",
            "type": "invalid_request_error",
            "message": message,
            "metric": exc.scope,
            **which,
            "limit": exc.limit,
            "requested": exc.requested,
        }
    else:
        error = {
            "code": "rate_limit_exceeded",
            "type": exc.scope,
            "message": message,
            **which,
            "retry_after_seconds": max(ceil_seconds(exc.retry_after), 1),
            "limit": exc.limit,
            "remaining": exc.remaining,
            "requested": exc.requested,
        }
    return {"detail": message, "error": error}


def error_payload(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Any other error in the same two-part shape as the quota errors; ``param`` names the
    offending field as OpenAI does (``messages[0].content``), ``None`` when no field is."""
    return {
        "detail": message,
        "error": {
            "code": code,
            "type": "invalid_request_error",
            "message": message,
            "param": param,
        },
    }


def simple_error(status: int, code: str, message: str, param: str | None = None) -> JsonResponse:
    return JsonResponse(error_payload(code, message, param), status=status)


def unavailable_retry_after() -> int:
    """``Retry-After`` of a 503 under the fail-closed policy: when the breaker probes again."""
    return max(ceil_seconds(services.get_breaker().retry_after()), 1)


def authentication_challenge(request: HttpRequest) -> str | None:
    """The ``WWW-Authenticate`` challenge of an anonymous refusal, by DRF's rule: that of the
    first class in ``REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"]`` (``Bearer``, ``Token``,
    ``Basic realm="api"``), or ``None`` when it has none (``SessionAuthentication``): a 401
    must carry a challenge, so DRF answers 403 then, and so do plain views."""
    from rest_framework.settings import api_settings

    classes = api_settings.DEFAULT_AUTHENTICATION_CLASSES
    return classes[0]().authenticate_header(request) if classes else None


CHUNKED_BODY_MESSAGE = (
    "A chunked request body cannot be read here (Django's WSGI handler reads it as empty): "
    "send the body with a Content-Length."
)


def chunked_body_unread(request: HttpRequest) -> bool:
    """Whether the body was sent chunked (no ``Content-Length``) to a WSGI server: Django then
    reads it as empty, and its estimate would be of nothing, so the quota refuses it (411).
    Under ASGI Django reads chunked bodies, and a WSGI layer that buffers them (the demo's)
    sets their length."""
    meta = request.META
    return (
        isinstance(request, WSGIRequest)
        and "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower()
        and not meta.get("CONTENT_LENGTH")
    )


def client_address(request: HttpRequest) -> str:
    """The key of an anonymous client: its address, as ``QUOTAS["NUM_PROXIES"]`` says to find
    it. ``None`` (the default) or ``0``: ``REMOTE_ADDR`` (``X-Forwarded-For`` is trivially
    spoofed). ``N``: the address the outermost of N trusted proxies saw, the N-th entry from
    the end of ``X-Forwarded-For`` (as DRF's ``NUM_PROXIES``); ``REMOTE_ADDR`` when that entry
    is not an IP address. IPv6 clients are keyed by their /64 network: one host holds a whole
    /64 and could otherwise take a fresh budget with every address in it."""
    remote = str(request.META.get("REMOTE_ADDR") or "unknown")
    proxies = quota_settings.NUM_PROXIES
    address = remote
    if proxies:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            address = hops[-min(proxies, len(hops))]
    return _address_key(address) or _address_key(remote) or remote


def _address_key(address: str) -> str | None:
    """An IPv4 address as it is, an IPv6 one as its /64 network; ``None``: not an address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:10.1.1.1 is 10.1.1.1
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
