"""OpenAPI descriptions of the app's endpoints and of its error bodies, for ``drf-spectacular``.

Optional: with ``drf-spectacular`` installed (``pip install "django-llm-quotas[openapi]"``)
``documented`` is its ``extend_schema``; without it, ``documented`` leaves a view as it is.
The serializers here describe bodies the app really sends (``quotas.http.error_body``,
``error_payload``, DRF's ``{"detail": ...}``); a host documents its own quota-enforced
views with ``QUOTA_ERRORS`` (``400``, ``413``, ``429``, ``503``) and ``AUTH_ERRORS``::

    from quotas.api.schema import AUTH_ERRORS, QUOTA_ERRORS, documented

    class ChatView(APIView):
        throttle_classes = [TokenQuotaThrottle]

        @documented(request=ChatSerializer, responses={200: AnswerSerializer,
                                                       **AUTH_ERRORS, **QUOTA_ERRORS})
        def post(self, request): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rest_framework import serializers

try:  # an optional dependency: the extra ``openapi``
    from drf_spectacular.types import OpenApiTypes
    from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
except ImportError:  # pragma: no cover - the app without drf-spectacular
    extend_schema = None  # type: ignore[assignment]

__all__ = [
    "AUTH_ERRORS",
    "QUOTA_ERRORS",
    "DetailSerializer",
    "QuotaErrorSerializer",
    "documented",
]


class DetailSerializer(serializers.Serializer):
    """DRF's error body: ``{"detail": "..."}`` (401, 403, 404, 409, 503)."""

    detail = serializers.CharField()


class QuotaErrorObjectSerializer(serializers.Serializer):
    """The OpenAI-style ``error`` object the official ``openai`` client parses."""

    code = serializers.CharField(help_text="rate_limit_exceeded, request_too_large, or why.")
    type = serializers.CharField(help_text="The refusing metric (429) or the error's kind.")
    message = serializers.CharField()
    param = serializers.CharField(
        required=False, allow_null=True, help_text="The offending field (400)."
    )
    scope = serializers.CharField(required=False, help_text="Whose limit: user, team, global.")
    window = serializers.CharField(required=False, allow_blank=True)
    model = serializers.CharField(required=False, allow_blank=True)
    metric = serializers.CharField(required=False, help_text="413: tokens or cost.")
    retry_after_seconds = serializers.IntegerField(required=False, min_value=1)
    limit = serializers.IntegerField(required=False)
    remaining = serializers.IntegerField(required=False)
    requested = serializers.IntegerField(required=False)


class QuotaErrorSerializer(serializers.Serializer):
    """A quota error (400, 411, 413, 429): ``detail`` and the OpenAI ``error`` object."""

    detail = serializers.CharField()
    error = QuotaErrorObjectSerializer()


# (serializer, description) per status; ``documented`` makes them OpenApiResponses.
Described = tuple[type[serializers.Serializer], str]
AUTH_ERRORS: dict[int, Described] = {
    401: (DetailSerializer, "Not authenticated (``WWW-Authenticate`` says how)."),
    403: (DetailSerializer, "Authenticated but not allowed."),
}
QUOTA_ERRORS: dict[int, Described] = {
    400: (QuotaErrorSerializer, "A body the quota estimator cannot read."),
    413: (
        QuotaErrorSerializer,
        "request_too_large: the request can never fit (a per-request cap or a whole budget).",
    ),
    429: (
        QuotaErrorSerializer,
        "rate_limit_exceeded: over a limit now; ``Retry-After`` (whole seconds, never early) "
        "and ``retry-after-ms`` say when it fits.",
    ),
    503: (DetailSerializer, "Redis unavailable under the fail-closed policy (``Retry-After``)."),
}
DECIDED = [200, 413, 429]
RATE_LIMIT_HEADERS = (
    ("X-RateLimit-Limit", "Token budget of the window.", DECIDED),
    ("X-RateLimit-Remaining", "Tokens left (absent while Redis is unavailable).", DECIDED),
    ("X-RateLimit-Reset", "Seconds until the whole budget is back.", DECIDED),
    ("Retry-After", "Whole seconds to wait (never early).", [429, 503]),
    ("retry-after-ms", "The same wait in milliseconds.", [429]),
)


def documented(
    *,
    responses: dict[int, Any],
    headers: bool = False,
    query: dict[str, tuple[str, list[str] | None]] | None = None,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """``extend_schema(responses=..., **kwargs)`` with ``(serializer, description)`` pairs
    turned into ``OpenApiResponse``; ``headers`` adds the rate-limit response headers;
    ``query`` names query parameters (``{name: (description, allowed values or None)}``).
    A no-op decorator without ``drf-spectacular``."""
    if extend_schema is None:
        return lambda view: view
    for name, (text, values) in (query or {}).items():
        parameter = OpenApiParameter(
            name, OpenApiTypes.STR, OpenApiParameter.QUERY, description=text, enum=values
        )
        kwargs["parameters"] = [*kwargs.get("parameters", []), parameter]
    described = {
        status: OpenApiResponse(response=value[0], description=value[1])
        if isinstance(value, tuple)
        else value
        for status, value in responses.items()
    }
    if headers:
        kwargs["parameters"] = [*kwargs.get("parameters", []), *_header_parameters()]
    return extend_schema(responses=described, **kwargs)  # type: ignore[no-any-return]


def _header_parameters() -> list[Any]:
    return [
        OpenApiParameter(
            name, OpenApiTypes.STR, OpenApiParameter.HEADER, response=codes, description=text
        )
        for name, text, codes in RATE_LIMIT_HEADERS
    ]
