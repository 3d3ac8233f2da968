"""Fail-open, bounded: what a process admits while its circuit breaker keeps Redis out.

Each process counts every limit of its degraded decisions in a ``LocalWindows`` of its own
and admits at most ``QUOTAS["DEGRADED_SHARE"]`` of each budget per window (1.0 by default:
the whole budget). With ``N`` processes an outage can overshoot a budget by at most
``N * DEGRADED_SHARE * budget`` per window. The counts are forgotten when the breaker closes
(Redis decides again, with the degraded usage charged by the settles and the ledger).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from quotas.conf import quota_settings
from quotas.core.decisions import Counter
from quotas.core.degraded import Concurrency, LocalVerdict
from quotas.core.limits import Metric
from quotas.core.types import QuotaState
from quotas.engine.runtime import degraded_windows, get_breaker
from quotas.engine.types import Reservation
from quotas.exceptions import QuotaExceeded

__all__ = ["admit_degraded", "degraded_windows", "settle_degraded"]


def _local_keys(counters: Sequence[Counter]) -> list[str]:
    """The local key of each counter: its scope's tag and the limit's key, as in Redis."""
    return [f"{counter.tag}/{counter.limit.key}" for counter in counters]


def admit_degraded(
    rid: str,
    counters: Sequence[Counter],
    amounts: Sequence[int],
    now_ms: int,
    state: QuotaState,
    concurrency: Concurrency | None = None,
) -> None:
    """Charge a degraded request locally, or raise ``QuotaExceeded`` (nothing charged) when
    one of its limits has no room left in this process's share (its requests in flight
    too, under ``concurrency``: until settled or expired)."""
    share = float(quota_settings.DEGRADED_SHARE)
    limits = [counter.limit for counter in counters]
    verdict = degraded_windows().admit(
        rid, _local_keys(counters), limits, amounts, share, now_ms, concurrency
    )
    if verdict.refusing == -1:
        raise QuotaExceeded(
            limit=verdict.slots, remaining=0, requested=1, retry_after=1.0,
            scope="concurrency", state=_with_retry(state, 1.0),
        )  # fmt: skip
    if not verdict.admitted:
        raise _refusal(counters, amounts, verdict, state)


def settle_degraded(reservation: Reservation, actual_tokens: int, actual_cost: int) -> None:
    """Replace a degraded reservation's local charge with its actual usage (once)."""
    per_metric = {
        Metric.TOKENS: actual_tokens - reservation.estimated_tokens,
        Metric.COST: actual_cost - reservation.estimated_cost,
        Metric.REQUESTS: 0,
    }
    deltas = [per_metric[counter.limit.metric] for counter in reservation.counters]
    degraded_windows().settle(reservation.id, deltas)


def _refusal(
    counters: Sequence[Counter], amounts: Sequence[int], verdict: LocalVerdict, state: QuotaState
) -> QuotaExceeded:
    """The 429 of a local refusal. A request larger than the process's allowance waits for
    the breaker's next probe (Redis may decide it then), at least a second."""
    index = verdict.refusing - 1
    limit = counters[index].limit
    if verdict.retry_ms is None:
        retry = max(get_breaker().retry_after(), 1.0)
    else:
        retry = verdict.retry_ms / 1000
    allowed = verdict.allowed[index]
    return QuotaExceeded(
        limit=limit.budget,
        remaining=max(allowed - verdict.used[index], 0),
        requested=amounts[index],
        retry_after=retry,
        scope=limit.metric.value,
        reset_seconds=retry,
        state=_with_retry(state, retry),
        limit_scope=limit.scope.value,
        window=limit.window.name,
        model=limit.model,
    )


def _with_retry(state: QuotaState, retry: float) -> QuotaState:
    return replace(state, retry_after=retry)
