"""Value types shared by the store and the services. Framework-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "Limits",
    "PolicyState",
    "QuotaState",
    "ReserveResult",
    "ReserveStatus",
    "SettleResult",
    "Snapshot",
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


@dataclass(frozen=True)
class PolicyState:
    """One limit's figures after a decision: ``name`` is its policy name (``tokens-hour``,
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

    def encode(self) -> str:
        """The compact form the Lua scripts store in the user's window hash."""
        return ",".join(
            [
                str(self.tokens_per_window),
                str(self.requests_per_minute or 0),
                str(self.max_concurrent_requests or 0),
                str(self.max_tokens_per_request or 0),
                str(self.default_output_tokens),
                self.plan_slug,
            ]
        )


class ReserveStatus(IntEnum):
    NEEDS_CONFIG = -1
    OVER_TOKENS = 0
    ALLOWED = 1
    OVER_REQUESTS = 2
    OVER_CONCURRENCY = 3
    OVER_REQUEST_CAP = 4
    OVER_BUDGET = 5
    DUPLICATE_ID = 6
    OVER_ATTEMPTS = 7


def _seconds(ms: float) -> float:
    return max(ms, 0) / 1000


@dataclass(frozen=True)
class ReserveResult:
    """What one reserve call decided, in the units clients see (seconds, tokens)."""

    status: ReserveStatus
    limit: int = 0
    remaining: int = 0
    reset_seconds: float = 0.0
    retry_after: float = 0.0
    reserved: int = 0
    requests_limit: int = 0
    requests_remaining: int = -1
    epoch: str = ""
    plan_slug: str = ""
    max_tokens_per_request: int = 0
    bucket: int = 0
    now_ms: int = 0
    tokens: int = 0
    requests_reset_seconds: float = 0.0
    window_has_epoch: bool = True
    concurrency_limit: int = 0
    in_flight: int = 0

    @property
    def allowed(self) -> bool:
        return self.status is ReserveStatus.ALLOWED

    @classmethod
    def from_script(cls, raw: list) -> ReserveResult:
        status = ReserveStatus(int(raw[0]))
        if status is ReserveStatus.NEEDS_CONFIG:
            return cls(status, window_has_epoch=bool(int(raw[1])))
        return cls(
            status=status,
            limit=int(raw[1]),
            remaining=int(raw[2]),
            reset_seconds=_seconds(int(raw[3])),
            retry_after=_seconds(int(raw[4])),
            reserved=int(raw[5]),
            requests_limit=int(raw[6]),
            requests_remaining=int(raw[7]),
            epoch=_text(raw[8]),
            plan_slug=_text(raw[9]),
            max_tokens_per_request=int(raw[10]),
            bucket=int(raw[11]),
            now_ms=int(raw[12]),
            tokens=int(raw[13]),
            requests_reset_seconds=_seconds(int(raw[14])),
            concurrency_limit=int(raw[15]),
            in_flight=int(raw[16]),
        )

    def state(self, window_seconds: float) -> QuotaState:
        """The figures response headers show for this decision."""
        return QuotaState(
            limit=self.limit,
            remaining=self.remaining,
            reset_seconds=self.reset_seconds,
            window_seconds=window_seconds,
            retry_after=0.0 if self.allowed else self.retry_after,
            requests_limit=self.requests_limit,
            requests_remaining=self.requests_remaining,
            requests_reset_seconds=self.requests_reset_seconds,
        )


@dataclass(frozen=True)
class SettleResult:
    """Outcome of a settle. ``status``: 1 settled; 0 unknown id (already settled or expired:
    nothing changed); 2 Redis had lost the reservation and the actual usage was charged to the
    rebuilt window; 3 the window is not rebuilt yet (the ledger row will seed it)."""

    status: int
    applied: int
    estimate: int
    reserved_at_ms: int
    limit: int
    remaining: int
    reset_seconds: float
    actual: int
    model: str

    @property
    def settled_now(self) -> bool:
        return self.status != 0

    @classmethod
    def from_script(cls, raw: list) -> SettleResult:
        status, applied, estimate, reserved_at, limit, remaining, reset, actual = (
            int(v) for v in raw[:8]
        )
        return cls(
            status,
            applied,
            estimate,
            reserved_at,
            limit,
            remaining,
            reset_seconds=_seconds(reset),
            actual=actual,
            model=_text(raw[8]),
        )


@dataclass(frozen=True)
class Snapshot:
    """A budget snapshot: ``used`` includes ``reserved``."""

    limit: int
    used: int
    reserved: int
    remaining: int
    reset_seconds: float
    requests_limit: int
    requests_used: int
    plan_slug: str
    max_tokens_per_request: int
    concurrency_limit: int
    in_flight: int

    @classmethod
    def from_script(cls, raw: list) -> Snapshot:
        return cls(
            limit=int(raw[1]),
            used=int(raw[2]),
            reserved=int(raw[3]),
            remaining=int(raw[4]),
            reset_seconds=_seconds(int(raw[5])),
            requests_limit=int(raw[6]),
            requests_used=int(raw[7]),
            plan_slug=_text(raw[8]),
            max_tokens_per_request=int(raw[9]),
            concurrency_limit=int(raw[10]),
            in_flight=int(raw[11]),
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, so a client that waits this long is never early."""
    return max(math.ceil(seconds - 1e-9), 0)
