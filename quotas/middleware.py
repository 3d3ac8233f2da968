"""``QuotaMiddleware``: settles reservations after the view and writes the quota headers.

It also enforces quotas on plain Django views marked with ``@enforce_quota``. How a
reservation is settled when the view did not settle it itself:

- a 4xx or 5xx response: a full refund (the call failed, nothing was used);
- a JSON response with an OpenAI-style ``usage`` block: the actual usage;
- a streaming response: when the stream ends or the client goes away, with the ``usage`` of a
  final chunk if one was sent, else the prompt plus the ``delta.content`` text produced so far
  (counted with tiktoken);
- any other 2xx response: the estimate stands.

Under ASGI the middleware runs in async mode (Django's ``sync_capable`` / ``async_capable``)
and never calls blocking code on the event loop. Enforcing a view (authenticating, reading
and estimating the body, reading the limits, reserving) is the same routine as in sync mode,
run in a worker thread (``sync_to_async(thread_sensitive=False)``): it needs the database for
``request.user`` and the limits anyway, and one routine keeps one set of answers, shared with
the DRF throttle. A worker thread, not Django's one thread for sync code, so concurrent
requests never queue behind each other's round trips. Streams are settled on the event loop
itself, with ``services.asettle`` (``redis.asyncio``): hundreds of streams may end at once.
A sync stream is served one chunk at a time (each read in a worker thread), not buffered
whole as Django would.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse

from quotas import services
from quotas.conf import quota_settings
from quotas.core.estimate import InvalidRequest
from quotas.core.types import QuotaState, ceil_seconds
from quotas.enforcement import (
    PROMPT_ATTR,
    REFUSED_ATTR,
    RESERVATION_ATTR,
    STATE_ATTR,
    AnonymousNotAllowed,
    body_too_large,
    enforce,
    record_if_rejected,
    refuse_if_blocked,
    state_of,
    too_deep,
)
from quotas.exceptions import ConfigurationError, QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.http import (
    CHUNKED_BODY_MESSAGE,
    authentication_challenge,
    chunked_body_unread,
    error_body,
    error_status,
    set_headers,
    simple_error,
    unavailable_retry_after,
)
from quotas.streaming import AsyncStreamMeter, StreamMeter, clean_usage
from quotas.throttling import TokenQuotaThrottle

__all__ = ["QuotaMiddleware"]

logger = logging.getLogger("quotas")


class QuotaMiddleware:
    """Settle after the view, add headers to every quota-enforced response."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
            # Django awaits a coroutine ``process_view`` rather than running the sync one in
            # its single thread for sync code.
            self.process_view = self._aprocess_view  # type: ignore[method-assign]

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        response = self.get_response(request)
        self._finish(request, response)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        if response.streaming and response.status_code < 400:
            self._finish(request, response)  # no I/O: the stream settles when it ends
        else:
            await _in_thread(self._finish)(request, response)
        return response

    async def _aprocess_view(
        self, request: HttpRequest, view: Any, args: Any, kwargs: Any
    ) -> HttpResponseBase | None:
        if not _enforced(view):
            return None
        if not getattr(view, "quota_enforced", False):
            # A DRF view (its throttle enforces): only this process's memory is read here.
            return QuotaMiddleware.process_view(self, request, view, args, kwargs)
        return await _in_thread(QuotaMiddleware.process_view)(self, request, view, args, kwargs)

    def _finish(self, request: HttpRequest, response: HttpResponseBase) -> None:
        """Settle (or hand the stream its meter), then write the headers."""
        record_if_rejected(request, response.status_code)
        reservation = getattr(request, RESERVATION_ATTR, None)
        if reservation is not None:
            self._settle(request, reservation, response)
        state = state_of(request)
        if state is not None:
            if state.retry_after and response.status_code < 400:
                # Refused, then served anyway (a degradation rung answered): nothing to wait
                # for, so no Retry-After on the answer.
                state = replace(state, retry_after=0.0)
            set_headers(response, state)
        refused = getattr(request, REFUSED_ATTR, None)
        if refused:  # too many rejected attempts: refused before any figure was read
            response["Retry-After"] = str(max(ceil_seconds(refused), 1))
            response["retry-after-ms"] = str(math.ceil(refused * 1000))

    def process_view(
        self, request: HttpRequest, view: Any, args: Any, kwargs: Any
    ) -> HttpResponseBase | None:
        if not _enforced(view):
            return None
        try:
            # By credentials alone: before the view authenticates, parses or estimates.
            refuse_if_blocked(request)
        except QuotaExceeded as exc:
            return JsonResponse(error_body(exc), status=error_status(exc))
        if not getattr(view, "quota_enforced", False):
            return None  # a DRF view: its throttle enforces
        estimate = getattr(view, "quota_estimate", None)
        if estimate is None and chunked_body_unread(request):
            return simple_error(411, "length_required", CHUNKED_BODY_MESSAGE)
        try:
            refuse_if_blocked(request, getattr(request, "user", None))
            tokens = estimate(request) if estimate else None
            enforce(
                request,
                getattr(request, "user", None),
                None if tokens is not None else _json_body(request),
                tokens,
            )
        except (QuotaExceeded, RequestTooLarge) as exc:
            return JsonResponse(error_body(exc), status=error_status(exc))
        except InvalidRequest as exc:
            return simple_error(400, exc.code, str(exc), exc.param)
        except AnonymousNotAllowed as exc:
            return _not_authenticated(request, str(exc))
        except ConfigurationError as exc:
            return simple_error(403, "quota_not_configured", str(exc))
        except StoreUnavailable:
            response = simple_error(503, "quota_unavailable", "Quota service unavailable.")
            response["Retry-After"] = str(unavailable_retry_after())
            return response
        return None

    def _settle(self, request: HttpRequest, reservation: Any, response: HttpResponseBase) -> None:
        failed = response.status_code >= 400
        if isinstance(response, StreamingHttpResponse) and not failed:
            # Headers are already on their way: the stream settles when it ends.
            response.streaming_content = self._meter(request, reservation, response)
            return
        state = state_of(request)
        settled: QuotaState | None
        if reservation.settlements:  # the view settled it itself: a second settle is a no-op
            settled = reservation.settlements[-1].state
        else:
            usage = {"total_tokens": 0} if failed else _usage_of(response)
            status = "refunded" if failed else "settled"
            batched = quota_settings.SETTLE_BATCH_SECONDS > 0
            if batched or (not self.async_mode and _after_response(reservation, response)):
                # Not sent yet: the headers tell the budget as of the reserve, plus this
                # request's own settle (Redis gets it from the batch, or once sent).
                tokens, cost = services.settle_charges(reservation, **usage)
                if batched:
                    services.settle_later(reservation, status=status, **usage)
                else:
                    response._resource_closers.append(  # type: ignore[attr-defined]
                        partial(_settle_sent, reservation, status, usage)
                    )
                settled = None
                if state is not None:
                    settled = _corrected(
                        state,
                        reservation.estimated_tokens - tokens,
                        reservation.estimated_cost - cost,
                    )
            else:
                settled = services.settle(reservation, status=status, **usage).state
        if settled is not None and not reservation.degraded:
            # The headers tell the budget after this request's real cost, in every limit.
            setattr(request, STATE_ATTR, settled)

    def _meter(self, request: HttpRequest, reservation: Any, response: Any) -> Any:
        prompt = getattr(request, PROMPT_ATTR, None)
        if response.is_async:
            return AsyncStreamMeter(response.streaming_content, reservation, prompt)
        if self.async_mode:  # a sync stream under ASGI: chunk by chunk, not buffered whole
            return AsyncStreamMeter.over_sync(response.streaming_content, reservation, prompt)
        return StreamMeter(response.streaming_content, reservation, prompt)


def _in_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run in a worker thread (never on the event loop, never queued behind the
    request's other sync code in Django's one thread for it); the thread's database
    connection is then closed or kept as ``CONN_MAX_AGE`` says, as at the end of a request."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


def _after_response(reservation: Any, response: HttpResponseBase) -> bool:
    """Whether ``response``'s settle may run once it has been sent (``SETTLE_AFTER_RESPONSE``):
    a WSGI server closes every response it has sent, whatever the client did, and Django
    then runs the response's closers (the test client closes responses too). Not under ASGI
    (``__acall__`` settles in the request): there a client that goes away while the outer
    middleware still runs cancels the request, and its response is never closed."""
    return (
        quota_settings.SETTLE_AFTER_RESPONSE
        and not reservation.holds_slot
        and isinstance(getattr(response, "_resource_closers", None), list)
    )


def _settle_sent(reservation: Any, status: str, usage: dict[str, int]) -> None:
    """The settle of a response already sent (Django ignores what its closers raise: this
    logs it; the reservation then expires and is charged at its estimate)."""
    try:
        services.settle(reservation, status=status, **usage)
    except Exception:
        logger.exception("quotas: settling %s after its response failed", reservation.id)


def _corrected(state: QuotaState, returned: int, returned_cost: int = 0) -> QuotaState:
    """``state`` with ``returned`` tokens given back to every token limit and
    ``returned_cost`` micro-dollars to every cost limit (a settle not sent yet: in this
    process's batch, or to run once the response has been sent)."""
    back = {"tokens": returned, "cost": returned_cost}
    policies = tuple(
        p._replace(remaining=p.remaining + back[p.metric]) if p.metric in back else p
        for p in state.policies
    )
    return replace(state, remaining=state.remaining + returned, policies=policies)


def _enforced(view: Any) -> bool:
    """Whether a view enforces quotas: marked by ``@enforce_quota``, or a DRF view whose
    throttles include ``TokenQuotaThrottle`` (worked out once per view)."""
    try:
        return _enforced_view(view)
    except TypeError:  # an unhashable callable: not cached
        return _enforced_view.__wrapped__(view)


@lru_cache(maxsize=4096)
def _enforced_view(view: Any) -> bool:
    if getattr(view, "quota_enforced", False):
        return True
    view_class = getattr(view, "cls", None) or getattr(view, "view_class", None)
    throttles = getattr(view_class, "throttle_classes", None) or ()
    return any(isinstance(t, type) and issubclass(t, TokenQuotaThrottle) for t in throttles)


def _not_authenticated(request: HttpRequest, message: str) -> HttpResponseBase:
    """401 with the challenge DRF would send, or 403 when there is none (DRF's rule)."""
    challenge = authentication_challenge(request)
    response = simple_error(401 if challenge else 403, "not_authenticated", message)
    if challenge:
        response["WWW-Authenticate"] = challenge
    return response


def _json_body(request: HttpRequest) -> Any:
    if len(request.body) > quota_settings.MAX_BODY_BYTES:
        raise body_too_large(len(request.body))
    try:
        return json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from exc
    except RecursionError as exc:  # the JSON parser's own nesting limit (about 1000 levels)
        raise too_deep() from exc


def _usage_of(response: HttpResponseBase) -> dict[str, int]:
    """``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` from a JSON body (from a
    DRF ``Response``'s data as the view returned it, without parsing the rendered body)."""
    data = getattr(response, "data", None)
    if isinstance(data, dict):
        return clean_usage(data.get("usage"))
    if "json" not in response.get("Content-Type", ""):
        return {}
    try:
        usage = json.loads(response.content).get("usage")  # type: ignore[attr-defined]
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {}
    return clean_usage(usage)
