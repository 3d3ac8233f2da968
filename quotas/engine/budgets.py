"""Budget snapshots (what ``GET /quotas/me/`` shows) and the admin's reset of a window."""

from __future__ import annotations

from typing import Any

from quotas.core.decisions import Counter, Figure, Peek
from quotas.core.limits import Metric
from quotas.engine.config import QuotaConfig
from quotas.engine.counters import all_counters, primary_index
from quotas.engine.plans import User, config_for, scope_for
from quotas.engine.runtime import get_store, guarded, window_spec
from quotas.engine.seeding import counter_seeds
from quotas.exceptions import StoreUnavailable

__all__ = ["budget_for", "reset_window", "snapshot"]


def budget_for(user: User) -> dict[str, Any]:
    """The caller's budget as ``GET /quotas/me/`` shows it: the plan's hourly token budget
    (``used`` includes ``reserved``; ``remaining`` is never negative, and ``debt`` is the
    usage beyond the limit, served requests that used more than their estimate, that must
    age out before ``remaining`` grows again), the team, and every limit in ``limits``."""
    config = config_for(user)
    scope = scope_for(user)
    counters = all_counters(config, scope)
    try:
        peek = guarded(snapshot, scope, config, counters)
    except StoreUnavailable:
        return _budget_dict(config, counters, None)
    return _budget_dict(config, counters, peek)


def snapshot(scope: str, config: QuotaConfig, counters: tuple[Counter, ...]) -> Peek:
    """Every counter's figures; counters Redis lost (or never had) are rebuilt from the
    ledger on the way."""
    store, primary = get_store(), primary_index(counters)
    peek = store.peek(scope, counters, primary=primary)
    if peek.unbuilt:
        team = config.team.id if config.team else None
        seeds = counter_seeds(scope, team, counters, peek.unbuilt)
        peek = store.peek(scope, counters, primary=primary, seeds=seeds)
    return peek


def _budget_dict(
    config: QuotaConfig, counters: tuple[Counter, ...], peek: Peek | None
) -> dict[str, Any]:
    limits, team = config.limits, config.team
    base: dict[str, Any] = {
        "plan": {"slug": limits.plan_slug, "name": limits.plan_name},
        "team": {"slug": team.slug, "name": team.name} if team else None,
        "window_seconds": window_spec().window_seconds,
        "limit": limits.tokens_per_window,
        "max_tokens_per_request": limits.max_tokens_per_request,
        "requests_per_minute": limits.requests_per_minute,
        "max_concurrent_requests": limits.max_concurrent_requests,
    }
    if peek is None:  # Redis unavailable: the limits, but no live figure
        base["limits"] = [_limit_entry(counter, None) for counter in counters]
        return {**base, **dict.fromkeys(LIVE_FIELDS), "degraded": True}
    figures = peek.figures
    base["limits"] = [_limit_entry(c, f) for c, f in zip(counters, figures, strict=True)]
    primary = figures[primary_index(counters) - 1]
    requests = next((f for c, f in zip(counters, figures, strict=True) if c.limit.key == "q"), None)
    remaining = limits.tokens_per_window - primary.total
    return {
        **base,
        "used": primary.total,
        "reserved": peek.reserved,
        # Usage above the estimate is charged even past the limit: what the window holds
        # beyond it is debt, shown on its own, so ``remaining`` never goes below 0.
        "remaining": max(remaining, 0),
        "debt": max(-remaining, 0),
        "reset_seconds": primary.reset_ms / 1000,
        "requests_used": requests.total if requests else None,
        "in_flight": peek.in_flight,
        "degraded": False,
    }


LIVE_FIELDS = (
    "used",
    "reserved",
    "remaining",
    "debt",
    "reset_seconds",
    "requests_used",
    "in_flight",
)


def _limit_entry(counter: Counter, figure: Figure | None) -> dict[str, Any]:
    """One limit as ``limits`` lists it (``figure`` ``None``: Redis is unavailable)."""
    limit = counter.limit
    used = figure.total if figure else None
    return {
        "name": limit.name,
        "scope": limit.scope.value,
        "metric": limit.metric.value,
        "model": limit.model,
        "window": limit.window.name,
        "window_seconds": limit.window.seconds if limit.window.is_sliding else None,
        "limit": limit.budget,
        "used": used,
        "remaining": None if used is None else max(limit.budget - used, 0),
        "reset_seconds": figure.reset_ms / 1000 if figure else None,
        "unit": "micro-dollars" if limit.metric is Metric.COST else limit.metric.value,
    }


def reset_window(user: User) -> None:
    """Give the user's whole budget back now (admin action), in every limit of their own
    (their team's and the global limits are shared: they are not reset), and forget their
    rejected attempts."""
    config, scope = config_for(user), scope_for(user)
    own = [c for c in all_counters(config, scope) if c.limit in config.user_layers()]
    own.sort(key=lambda c: c.limit.counter != "w")  # the primary first
    get_store().reset(scope, own)
