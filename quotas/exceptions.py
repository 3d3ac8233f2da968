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
    "cost": ("micro-dollar", "micro-dollars", "micro-dollars", "remaining"),
}


class QuotaError(Exception):
    """Base class of every error this app raises."""


class QuotaExceeded(QuotaError):
    """The request fits the plan but not right now: retry after ``retry_after`` seconds.

    ``scope`` says which kind of limit refused (its metric), and ``limit``, ``remaining`` and
    ``requested`` are in that limit's units: ``"tokens"`` (tokens in the window),
    ``"requests"`` (requests in the window; ``requested`` is 1), ``"cost"`` (micro-dollars:
    1,000,000 is $1) or ``"concurrency"`` (requests in flight at once; ``remaining`` is the
    free slots, ``requested`` is 1). ``limit_scope`` says whose limit it is (``"user"``,
    ``"team"``, ``"global"``), ``window`` its window (``"hour"``, ``"minute"``, ``"1d"``,
    ``"month"``) and ``model`` its model glob (blank: every model).
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
        limit_scope: str = "user",
        window: str = "",
        model: str = "",
    ) -> None:
        self.limit_scope = limit_scope
        self.window = window
        self.model = model
        self.limit = limit
        self.state = state
        self.remaining = remaining
        self.requested = requested
        self.retry_after = retry_after
        self.scope = scope
        self.reset_seconds = reset_seconds
        one, several, unit, left = UNITS.get(scope, UNITS["tokens"])
        which = " ".join(
            part
            for part in (
                "" if limit_scope == "user" else limit_scope,
                scope,
                f"per {window}" if window else "",
                f"for {model}" if model else "",
            )
            if part
        )
        super().__init__(
            f"Rate limit exceeded for {which}: requested {requested} "
            f"{one if requested == 1 else several}, {remaining} of {limit} {unit} {left}; "
            f"retry after {retry_after:.3f}s."
        )


class RequestTooLarge(QuotaError):
    """The request can never fit: it is over a per-request cap or over a whole budget.

    ``scope`` is the metric of the limit it cannot fit (``"tokens"``, or ``"cost"``:
    ``limit`` and ``requested`` are then micro-dollars); ``limit_scope``, ``window`` and
    ``model`` name that limit as in ``QuotaExceeded``."""

    def __init__(
        self,
        *,
        limit: int,
        requested: int,
        reason: str,
        state: QuotaState | None = None,
        scope: str = "tokens",
        limit_scope: str = "user",
        window: str = "",
        model: str = "",
    ) -> None:
        self.limit = limit
        self.state = state
        self.requested = requested
        self.reason = reason
        self.scope = scope
        self.limit_scope = limit_scope
        self.window = window
        self.model = model
        unit = UNITS.get(scope, UNITS["tokens"])[1]
        super().__init__(
            f"Request too large: {requested} {unit} requested, {reason} is {limit} {unit}."
        )


class StoreUnavailable(QuotaError):
    """The quota store (Redis) could not be reached or answered with an error."""


class ConfigurationError(QuotaError):
    """The quota configuration cannot decide for this user (e.g. no plan and no default plan)."""
