"""DRF throttle enforcing token quotas.

    class ChatView(APIView):
        throttle_classes = [TokenQuotaThrottle]

On async DRF (``adrf``) views, ``TokenQuotaThrottle`` works as it is (adrf runs a view's
sync throttles in the thread of its ``initial``), and ``AsyncTokenQuotaThrottle`` is its
coroutine form, for hosts whose throttles are all async.

The throttle estimates the request body (``QUOTAS["ESTIMATOR"]``; a view can give its own
figure with ``get_token_estimate(request)``), reserves it atomically, and turns a refusal
into the 429 / 413 responses clients expect. DRF has no hook after the response, so
``quotas.middleware.QuotaMiddleware`` settles the reservation and writes the headers.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from quotas.conf import quota_settings
from quotas.core.estimate import InvalidRequest
from quotas.enforcement import (
    AnonymousNotAllowed,
    body_too_large,
    enforce,
    refuse_if_blocked,
    too_deep,
)
from quotas.exceptions import ConfigurationError, QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.http import (
    CHUNKED_BODY_MESSAGE,
    chunked_body_unread,
    error_body,
    error_payload,
    error_status,
    unavailable_retry_after,
)

__all__ = ["AsyncTokenQuotaThrottle", "QuotaRejected", "TokenQuotaThrottle"]


class QuotaRejected(exceptions.APIException):
    """A 429 or 413 whose body keeps its numbers (DRF would turn them into strings)."""

    def __init__(self, exc: QuotaExceeded | RequestTooLarge) -> None:
        super().__init__()
        self.status_code = error_status(exc)
        self.detail = error_body(exc)  # type: ignore[assignment]


class QuotaBadRequest(exceptions.APIException):
    """A 400 for a body the estimator cannot read, in the same shape as the quota errors
    (``error.code`` and ``error.param`` from the ``InvalidRequest``)."""

    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, exc: InvalidRequest) -> None:
        super().__init__()
        payload = error_payload(exc.code, str(exc), exc.param)
        self.detail = payload  # type: ignore[assignment]


class QuotaLengthRequired(exceptions.APIException):
    """411 for a chunked body the estimator would read as empty (see ``chunked_body_unread``)."""

    status_code = status.HTTP_411_LENGTH_REQUIRED

    def __init__(self) -> None:
        super().__init__()
        self.detail = error_payload("length_required", CHUNKED_BODY_MESSAGE)  # type: ignore[assignment]


class QuotaUnavailable(exceptions.APIException):
    """503 under the fail-closed policy; DRF turns ``wait`` into ``Retry-After``."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Quota service unavailable; try again shortly."
    default_code = "quota_unavailable"

    def __init__(self) -> None:
        super().__init__()
        self.wait = unavailable_retry_after()


class QuotaNotConfigured(exceptions.PermissionDenied):
    default_code = "quota_not_configured"


class TokenQuotaThrottle(BaseThrottle):
    """Reserve the request's tokens; raise the matching API error when refused."""

    def allow_request(self, request: Request, view: Any) -> bool:
        self.retry_after: float | None = None
        try:
            # A client over its rejected-attempts allowance costs no parsing or estimating.
            refuse_if_blocked(request._request, request.user)
            tokens = None
            if hasattr(view, "get_token_estimate"):
                tokens = view.get_token_estimate(request)
            if tokens is None and chunked_body_unread(request._request):
                raise QuotaLengthRequired()
            body = _body(request) if tokens is None else None
            enforce(request._request, request.user, body, tokens)
        except InvalidRequest as exc:
            raise QuotaBadRequest(exc) from exc
        except AnonymousNotAllowed as exc:
            raise exceptions.NotAuthenticated(str(exc)) from exc
        except QuotaExceeded as exc:
            self.retry_after = exc.retry_after
            raise QuotaRejected(exc) from exc
        except RequestTooLarge as exc:
            raise QuotaRejected(exc) from exc
        except ConfigurationError as exc:
            raise QuotaNotConfigured(str(exc)) from exc
        except StoreUnavailable as exc:
            raise QuotaUnavailable() from exc
        return True

    def wait(self) -> float | None:
        return self.retry_after


class AsyncTokenQuotaThrottle(TokenQuotaThrottle):
    """``TokenQuotaThrottle`` with a coroutine ``allow_request``, for async DRF (``adrf``)
    views: adrf awaits it on the event loop. The routine itself reads the user and, on a
    miss, the limits from the database and makes a blocking reserve, so it runs in a worker
    thread (never on the event loop), whose database connection is then closed or kept as
    ``CONN_MAX_AGE`` says."""

    async def allow_request(self, request: Request, view: Any) -> bool:  # type: ignore[override]
        return bool(
            await sync_to_async(self._allow_in_thread, thread_sensitive=False)(request, view)
        )

    def _allow_in_thread(self, request: Request, view: Any) -> bool:
        try:
            return TokenQuotaThrottle.allow_request(self, request, view)
        finally:
            close_old_connections()


def _body(request: Request) -> Any:
    """The parsed body, refusing what the estimator will not read (``InvalidRequest``)."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > quota_settings.MAX_BODY_BYTES:
        raise body_too_large(int(length))
    try:
        return request.data
    except exceptions.ParseError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.detail}") from exc
    except RecursionError as exc:  # the JSON parser's own nesting limit (about 1000 levels)
        raise too_deep() from exc
