"""When a failed attempt is tried again, and how long to wait first (tenacity).

Retried: 429s (unless the call may degrade: then the next rung serves instead), 5xx,
timeouts and connection errors. The wait is exponential backoff with full jitter
(``uniform(0, min(cap, base * 2 ** n))``), never shorter than the provider's
``retry-after-ms`` / ``retry-after``; no retry starts a wait that would end past the call's
deadline, and there are at most ``LLM_MAX_ATTEMPTS`` attempts. The SDK's own retries are off
(``max_retries=0``) so the two never multiply.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

from quotas.conf import quota_settings
from quotas.core.ratelimits import retry_after_ms

__all__ = ["async_retrying", "backoff_seconds", "is_retryable", "retrying", "status_of"]


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an SDK error that has one."""
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: throttled, a server error, or no answer at all."""
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    status = status_of(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def provider_retry_after(exc: BaseException | None) -> float:
    """The provider's own advice on an error's response, in seconds (0 when none)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return 0.0
    advice = retry_after_ms({k.lower(): v for k, v in headers.items()})
    return (advice or 0) / 1000


def backoff_seconds(attempt: int, exc: BaseException | None, rng: Callable[[], float]) -> float:
    """The wait before attempt ``attempt + 1``: full jitter, at least the provider's advice."""
    base = float(quota_settings.LLM_RETRY_BASE_SECONDS)
    cap = float(quota_settings.LLM_RETRY_MAX_SECONDS)
    jitter = rng() * min(cap, base * 2 ** (attempt - 1))
    return max(jitter, provider_retry_after(exc))


def _policy(deadline: float, rng: Callable[[], float]) -> dict[str, Any]:
    max_attempts = int(quota_settings.LLM_MAX_ATTEMPTS)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return backoff_seconds(state.attempt_number, exc, rng)

    def stop(state: RetryCallState) -> bool:
        # Never start a wait that ends past the deadline: the caller gets the error now.
        late = time.monotonic() + state.upcoming_sleep >= deadline
        return state.attempt_number >= max_attempts or late

    return {
        "retry": retry_if_exception(is_retryable),
        "wait": wait,
        "stop": stop,
        "reraise": True,
    }


def retrying(deadline: float, rng: Callable[[], float] = random.random) -> Retrying:
    """Attempts of one call until ``deadline`` (a ``time.monotonic()`` moment)."""
    return Retrying(**_policy(deadline, rng))


def async_retrying(deadline: float, rng: Callable[[], float] = random.random) -> AsyncRetrying:
    """``retrying`` for coroutines (waits with ``asyncio.sleep``)."""
    return AsyncRetrying(**_policy(deadline, rng))
