"""Exceptions raised by the quota engine. Framework-free: no Django, DRF or Celery."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quotas.core.types import QuotaState

__all__ = [
    "ConfigurationError",
    "QuotaError",
    "QuotaExceeded",
    "RequestTooLarge",
    "StoreUnavailable",
]


# The words of a refusal's figures, by the limit that refused: one unit, several, the limit's
# unit, and what ``remaining`` counts.
UNITS = {
    "tokens": ("token", "tokens", "tokens", "remaining"),
    "requests": ("request", "requests", "requests per minute", "remaining"),
    "concurrency": ("concurrent request", "concurrent requests", "concurrent requests", "free"),
}


class QuotaError(Exception):
    """Base class of every error this app raises."""


class QuotaExceeded(QuotaError):
    """The request fits the plan but not right now: retry after ``retry_after`` seconds.

    ``scope`` says which limit refused, and ``limit``, ``remaining`` and ``requested`` are in
    that limit's units: ``"tokens"`` (tokens in the window), ``"requests"`` (requests in the
    minute; ``requested`` is 1) or ``"concurrency"`` (requests in flight at once; ``remaining``
    is the free slots, ``requested`` is 1).
    """

    def __init__(
        self,
        *,
        limit: int,
        remaining: int,
        requested: int,
        retry_after: float,
        scope: str = "tokens",
        reset_seconds: float = 0.0,
        state: QuotaState | None = None,
    ) -> None:
        self.limit = limit
        self.state = state
        self.remaining = remaining
        self.requested = requested
        self.retry_after = retry_after
        self.scope = scope
        self.reset_seconds = reset_seconds
        one, several, unit, left = UNITS.get(scope, UNITS["tokens"])
        super().__init__(
            f"Rate limit exceeded for {scope}: requested {requested} "
            f"{one if requested == 1 else several}, {remaining} of {limit} {unit} {left}; "
            f"retry after {retry_after:.3f}s."
        )


class RequestTooLarge(QuotaError):
    """The request can never fit: it is over the per-request cap or over the whole budget."""

    def __init__(
        self, *, limit: int, requested: int, reason: str, state: QuotaState | None = None
    ) -> None:
        self.limit = limit
        self.state = state
        self.requested = requested
        self.reason = reason
        super().__init__(
            f"Request too large: {requested} tokens requested, {reason} is {limit} tokens."
        )


class StoreUnavailable(QuotaError):
    """The quota store (Redis) could not be reached or answered with an error."""


class ConfigurationError(QuotaError):
    """The quota configuration cannot decide for this user (e.g. no plan and no default plan)."""
