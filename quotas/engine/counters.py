"""From limits to Redis counters and back: which counters a request charges and how much,
and what their figures tell the client (``QuotaState`` for the headers and the budget).

A limit's counter lives under its scope's hash tag: the user's quota key, ``t:<team id>``
for a team, ``g`` for global limits; so one decision touches at most three Redis Cluster
slots. A counter's *name* (what a reservation record keeps, to settle it by id) is its key
suffix, prefixed by the tag for a team's or a global counter (``t:7/l.t.…``, ``g/l.r.…``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quotas.core.decisions import SEED_MIN_WINDOW_MS, Counter, Figure
from quotas.core.limits import Limit, Metric, Scope
from quotas.core.types import PolicyState, QuotaState
from quotas.engine.config import QuotaConfig

__all__ = [
    "Charges",
    "all_counters",
    "charges_for",
    "counter_for",
    "primary_index",
    "quota_state",
    "tag_of",
]

GLOBAL_TAG = "g"


@dataclass(frozen=True)
class Charges:
    """The counters of one decision, what the request charges to each (``amounts``), the
    primary's 1-based index (0: the decision has none), and the counters' names for the
    reservation record."""

    counters: tuple[Counter, ...]
    amounts: tuple[int, ...]
    primary: int
    names: str


def tag_of(limit: Limit, scope: str, config: QuotaConfig) -> str:
    """The hash tag of ``limit``'s counter for quota key ``scope``."""
    if limit.scope is Scope.TEAM and config.team is not None:
        return config.team.tag
    if limit.scope is Scope.GLOBAL:
        return GLOBAL_TAG
    return scope


def counter_for(limit: Limit, tag: str) -> Counter:
    """``limit``'s counter under ``tag``. The primary counter and windows longer than a few
    minutes are rebuilt from the ledger when Redis loses them; shorter ones start empty
    (their rows are mostly still on their way)."""
    window = limit.window
    seeded = limit.counter == "w" or not window.is_sliding
    seeded = seeded or window.window_ms > SEED_MIN_WINDOW_MS
    return Counter(tag, limit, seeded)


def charges_for(
    limits: tuple[Limit, ...], scope: str, config: QuotaConfig, tokens: int, cost: int
) -> Charges:
    """The counters a request of ``tokens`` tokens costing ``cost`` micro-dollars charges.
    The counters (the same for every request of a user and model) are made once per config."""
    known = config.charges.get((scope, limits))
    if known is None:
        counters = tuple(counter_for(limit, tag_of(limit, scope, config)) for limit in limits)
        names = ",".join(counter.name for counter in counters)
        known = (counters, primary_index(counters), names)
        if len(config.charges) < 256:
            config.charges[(scope, limits)] = known
    counters, primary, names = known
    per_metric = {Metric.TOKENS: tokens, Metric.REQUESTS: 1, Metric.COST: cost}
    amounts = tuple(per_metric[counter.limit.metric] for counter in counters)
    return Charges(counters, amounts, primary, names)


def all_counters(config: QuotaConfig, scope: str) -> tuple[Counter, ...]:
    """The counter of every limit in ``config`` (all models), charging nothing."""
    return tuple(counter_for(limit, tag_of(limit, scope, config)) for limit in config.layers)


def primary_index(counters: Sequence[Counter]) -> int:
    """The 1-based index of the user's primary counter among ``counters`` (0: none)."""
    return next((i for i, c in enumerate(counters, 1) if c.limit.counter == "w"), 0)


def quota_state(
    counters: Sequence[Counter],
    figures: Sequence[Figure],
    now_ms: int,
    *,
    retry_after: float = 0.0,
) -> QuotaState:
    """What the headers say: every limit's figures (``policies``), and the most restrictive
    token and request limits in the fields of earlier versions."""
    policies = tuple(
        policy(counter.limit, figure, now_ms)
        for counter, figure in zip(counters, figures, strict=True)
    )
    tokens = _tightest(p for p in policies if p.metric == Metric.TOKENS)
    requests = _tightest(p for p in policies if p.metric == Metric.REQUESTS)
    return QuotaState(
        limit=tokens.limit if tokens else 0,
        remaining=tokens.remaining if tokens else 0,
        reset_seconds=tokens.reset_seconds if tokens else 0.0,
        window_seconds=tokens.window_seconds if tokens else 0,
        retry_after=retry_after,
        requests_limit=requests.limit if requests else 0,
        requests_remaining=requests.remaining if requests else 0,
        requests_reset_seconds=requests.reset_seconds if requests else 0.0,
        policies=policies,
    )


def policy(limit: Limit, figure: Figure, now_ms: int) -> PolicyState:
    return PolicyState(
        name=limit.name,
        scope=limit.scope.value,
        metric=limit.metric.value,
        model=limit.model,
        window=limit.window.name,
        limit=limit.budget,
        remaining=limit.budget - figure.total,
        reset_seconds=figure.reset_ms / 1000,
        window_seconds=limit.window.policy_seconds(now_ms),
    )


def _tightest(policies: Iterable[PolicyState]) -> PolicyState | None:
    """The policy with the least left (the longest reset breaks a tie)."""
    return min(policies, key=lambda p: (p.remaining, -p.reset_seconds), default=None)
