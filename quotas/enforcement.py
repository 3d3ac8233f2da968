"""One enforcement routine for the DRF throttle and for plain Django views.

``enforce`` estimates the request (unless the view gives a figure), reserves it, and keeps the
reservation and the figures for the headers on the Django request, where ``QuotaMiddleware``
settles it after the view and writes the headers.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from quotas import services
from quotas.conf import quota_settings
from quotas.core.bounds import MAX_JSON_DEPTH, InvalidRequest
from quotas.core.types import QuotaState
from quotas.exceptions import QuotaExceeded, RequestTooLarge

__all__ = ["AnonymousNotAllowed", "body_too_large", "enforce", "too_deep"]

RESERVATION_ATTR = "quota_reservation"
STATE_ATTR = "quota_state"
PROMPT_ATTR = "quota_prompt_tokens"


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
        from quotas.http import client_address

        address = client_address(request)
    if tokens is not None:
        model, named, add_default = "", tokens, False
    else:
        estimate = services.estimate(body)
        model, named = estimate.model, estimate.named_tokens
        add_default = estimate.output_tokens is None
        setattr(request, PROMPT_ATTR, estimate.prompt_tokens)
    try:
        reservation = services.reserve(
            user, named, model=model, client_address=address, add_default_output=add_default
        )
    except (QuotaExceeded, RequestTooLarge) as exc:
        if exc.state is not None:
            setattr(request, STATE_ATTR, exc.state)
        raise
    setattr(request, RESERVATION_ATTR, reservation)
    setattr(request, STATE_ATTR, reservation.state)


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


def state_of(request: HttpRequest) -> QuotaState | None:
    return getattr(request, STATE_ATTR, None)
