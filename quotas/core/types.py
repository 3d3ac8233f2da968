"""Value types of the engine: window geometry, a plan's own limits, what clients are told.
Framework-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Limits",
    "PolicyState",
    "QuotaState",
    "WindowSpec",
    "ceil_seconds",
]


@dataclass(frozen=True)
class WindowSpec:
    """Window geometry in milliseconds: the token window and the requests-per-minute window."""

    window_ms: int
    bucket_ms: int
    rpm_window_ms: int = 60_000
    rpm_bucket_ms: int = 1_000

    @classmethod
    def from_seconds(cls, window: float, bucket: float, rpm_bucket: float = 1.0) -> WindowSpec:
        window_ms, bucket_ms = round(window * 1000), round(bucket * 1000)
        if bucket_ms <= 0 or window_ms < bucket_ms or window_ms % bucket_ms:
            raise ValueError(
                f"WINDOW_SECONDS ({window}) must be a positive multiple of BUCKET_SECONDS "
                f"({bucket})."
            )
        rpm_bucket_ms = round(rpm_bucket * 1000)
        if rpm_bucket_ms <= 0 or 60_000 % rpm_bucket_ms:
            raise ValueError(f"RPM_BUCKET_SECONDS ({rpm_bucket}) must divide 60.")
        return cls(window_ms, bucket_ms, 60_000, rpm_bucket_ms)

    @property
    def window_seconds(self) -> float:
        return self.window_ms / 1000

    def bucket_of(self, epoch_ms: int) -> int:
        """Index of the bucket that holds a moment (ms since the Unix epoch)."""
        return epoch_ms // self.bucket_ms


@dataclass(frozen=True)
class QuotaState:
    """What a client is told about its budget: token figures, and request figures when a
    requests-per-minute limit applies (``requests_limit`` 0: none). ``retry_after`` is set on
    rejections only."""

    limit: int
    remaining: int
    reset_seconds: float
    window_seconds: float
    retry_after: float = 0.0
    requests_limit: int = 0
    requests_remaining: int = 0
    requests_reset_seconds: float = 0.0
    degraded: bool = False
    # Every limit that applied, for RateLimit-Policy and GET /quotas/me/ (the fields above
    # are the most restrictive token and request limits among them).
    policies: tuple[PolicyState, ...] = ()


class PolicyState(NamedTuple):
    """One limit's figures after a decision (a named tuple: one is made per limit and
    request): ``name`` is its policy name (``tokens-hour``,
    ``team-requests-minute``, ``global-cost-month``), ``remaining`` may be negative (debt:
    usage beyond the limit, served)."""

    name: str
    scope: str
    metric: str
    model: str
    window: str
    limit: int
    remaining: int
    reset_seconds: float
    window_seconds: int


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one quota key. ``None`` means no such limit."""

    tokens_per_window: int
    plan_slug: str = ""
    plan_name: str = ""
    max_tokens_per_request: int | None = None
    requests_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    default_output_tokens: int = 256


def ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, so a client that waits this long is never early."""
    return max(math.ceil(seconds - 1e-9), 0)
