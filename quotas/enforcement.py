"""One enforcement routine for the DRF throttle and for plain Django views.

``enforce`` estimates the request (unless the view gives a figure), reserves it, and keeps the
reservation and the figures for the headers on the Django request, where ``QuotaMiddleware``
settles it after the view and writes the headers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.http import HttpRequest

from quotas import services
from quotas.conf import quota_settings
from quotas.core.bounds import MAX_JSON_DEPTH, InvalidRequest
from quotas.core.types import QuotaState
from quotas.exceptions import QuotaExceeded, RequestTooLarge
from quotas.http import client_address

__all__ = [
    "AnonymousNotAllowed",
    "body_too_large",
    "enforce",
    "prompt_tokens_of",
    "record_if_rejected",
    "refuse_if_blocked",
    "reservation_of",
    "too_deep",
    "use_reservation",
]

RESERVATION_ATTR = "quota_reservation"
STATE_ATTR = "quota_state"
PROMPT_ATTR = "quota_prompt_tokens"
# The request reached a quota-enforced view: its 400s and 413s are rejected attempts.
ENFORCED_ATTR = "quota_enforced"
# Its rejected attempt is already counted (a 413 the reserve script counted itself).
COUNTED_ATTR = "quota_attempt_counted"
# Seconds it was refused for, for too many rejected attempts (for the retry headers).
REFUSED_ATTR = "quota_attempts_refused"


class AnonymousNotAllowed(Exception):
    """An anonymous request reached an enforced endpoint and no anonymous plan is set."""


def enforce(request: HttpRequest, user: Any, body: Any, tokens: int | None = None) -> None:
    """Reserve for this request or raise; see the module docstring.

    Raises ``InvalidRequest`` (bad body), ``QuotaExceeded``, ``RequestTooLarge``,
    ``AnonymousNotAllowed``, ``ConfigurationError`` and, under the fail-closed policy,
    ``StoreUnavailable``.
    """
    address = None
    if user is None or not user.is_authenticated:
        if not quota_settings.ANONYMOUS_PLAN:
            raise AnonymousNotAllowed("Authentication credentials were not provided.")
        address = client_address(request)
    prompt: int | None = None
    if tokens is not None:
        model, named, add_default = "", tokens, False
    else:
        estimate = services.estimate(body)
        model, named = estimate.model, estimate.named_tokens
        add_default, prompt = estimate.output_tokens is None, estimate.prompt_tokens
        setattr(request, PROMPT_ATTR, prompt)
    try:
        reservation = services.reserve(
            user,
            named,
            model=model,
            client_address=address,
            add_default_output=add_default,
            prompt_tokens=prompt,
        )
    except (QuotaExceeded, RequestTooLarge) as exc:
        if exc.state is not None:
            setattr(request, STATE_ATTR, exc.state)
        _note_refusal(request, user, address, exc)
        raise
    setattr(request, RESERVATION_ATTR, reservation)
    setattr(request, STATE_ATTR, reservation.state)


def _note_refusal(
    request: HttpRequest, user: Any, address: str | None, exc: QuotaExceeded | RequestTooLarge
) -> None:
    if isinstance(exc, QuotaExceeded) and exc.scope == "attempts":
        scope = services.scope_for(user, address)
        services.block(keys_for(request, scope), exc.retry_after)


def _scope_of(request: HttpRequest, user: Any) -> str | None:
    """The client's quota key, ``None`` when it is anonymous without an anonymous plan."""
    if user is not None and user.is_authenticated:
        return str(user.pk)
    if quota_settings.ANONYMOUS_PLAN:
        return services.scope_for(None, client_address(request))
    return None


def refuse_if_blocked(request: HttpRequest, user: Any = None) -> None:
    """Mark the request as quota-enforced, and raise the 429 ``QuotaExceeded`` of a client
    this process knows to be over its rejected-attempts allowance (no I/O: before anything
    reads or estimates the body)."""
    setattr(request, ENFORCED_ATTR, True)
    keys = keys_for(request, _scope_of(request, user) if user is not None else None)
    seconds = services.blocked_for(keys)
    if seconds:
        setattr(request, REFUSED_ATTR, seconds)
        raise services.refusal(seconds)


def record_if_rejected(request: HttpRequest, status: int) -> None:
    """Count a 400 or 413 of a quota-enforced request as a rejected attempt of its client,
    when the client is known (``request.user``, which DRF sets once it authenticates)."""
    if status not in (400, 413) or not getattr(request, ENFORCED_ATTR, False):
        return
    if getattr(request, COUNTED_ATTR, False):
        return
    scope = _scope_of(request, getattr(request, "user", None))
    if scope is not None:
        services.record_rejected(scope, keys_for(request, scope))


def body_too_large(length: int | None) -> InvalidRequest:
    """The 400 of a body over ``MAX_BODY_BYTES`` (``length``: its size, when declared)."""
    size = f"of {length} bytes " if length is not None else ""
    limit = quota_settings.MAX_BODY_BYTES
    return InvalidRequest(
        f"Request body {size}is over the {limit}-byte limit.", code="request_body_too_large"
    )


def too_deep() -> InvalidRequest:
    """The 400 of a body nested too deeply for the JSON parser itself."""
    return InvalidRequest(
        f"The request body nests objects and lists more than {MAX_JSON_DEPTH} levels deep."
    )


def prompt_tokens_of(request: Any) -> int | None:
    """The prompt tokens the quota estimate counted for this request (a Django or DRF
    request), ``None`` when nothing was estimated (the view gave its own figure, or the
    request was not quota-enforced). A view that needs the figure need not count again."""
    django_request = getattr(request, "_request", request)
    return getattr(django_request, PROMPT_ATTR, None)


def reservation_of(request: Any) -> Any:
    """The reservation the quota throttle (or ``@enforce_quota``) made for this request (a
    Django or DRF request), ``None`` when there is none."""
    return getattr(getattr(request, "_request", request), RESERVATION_ATTR, None)


def use_reservation(request: Any, reservation: Any) -> None:
    """Make ``reservation`` the one that served this request: ``QuotaMiddleware`` settles it
    (unless it is settled already) and writes the headers from its figures. For code that
    reserved again for the request (``quotas.llm`` serving it with a cheaper model)."""
    django_request = getattr(request, "_request", request)
    setattr(django_request, RESERVATION_ATTR, reservation)
    setattr(django_request, STATE_ATTR, reservation.state)


def state_of(request: HttpRequest) -> QuotaState | None:
    return getattr(request, STATE_ATTR, None)


def keys_for(request: HttpRequest, scope: str | None) -> list[str]:
    """The keys a client is remembered by: its credentials, and its quota key when known."""
    prefix = quota_settings.KEY_PREFIX
    keys = []
    authorization = request.META.get("HTTP_AUTHORIZATION")
    if authorization:
        digest = hashlib.blake2b(authorization.encode(errors="replace"), digest_size=16)
        keys.append(f"{prefix}:auth:{digest.hexdigest()}")
    if scope is not None:
        keys.append(f"{prefix}:scope:{scope}")
    return keys
