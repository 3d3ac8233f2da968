"""Opt a plain Django view into quota enforcement (``QuotaMiddleware`` does the work)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["enforce_quota"]

V = TypeVar("V", bound=Callable[..., Any])


def enforce_quota(view: V | None = None, *, estimate: Callable[..., int] | None = None) -> Any:
    """Mark a view as quota-enforced.

    The request body is estimated as an OpenAI request unless ``estimate(request) -> int``
    is given. Use bare (``@enforce_quota``) or with arguments (``@enforce_quota(estimate=f)``).
    """

    def mark(func: V) -> V:
        func.quota_enforced = True  # type: ignore[attr-defined]
        func.quota_estimate = estimate  # type: ignore[attr-defined]
        return func

    return mark(view) if view is not None else mark
