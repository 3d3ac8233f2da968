"""Budget snapshots (what ``GET /quotas/me/`` shows) and the admin's reset of a window."""

from __future__ import annotations

import uuid
from typing import Any

from quotas.core.types import Limits, Snapshot
from quotas.engine.plans import User, limits_for, scope_for
from quotas.engine.runtime import get_store, guarded, window_spec
from quotas.engine.seeding import config_for
from quotas.exceptions import StoreUnavailable

__all__ = ["budget_for", "reset_window"]


def budget_for(user: User) -> dict[str, Any]:
    """The caller's budget as ``GET /quotas/me/`` shows it: ``used`` includes ``reserved``;
    ``remaining`` is never negative, and ``debt`` is the usage beyond the limit (served
    requests that used more than their estimate) that must age out before ``remaining``
    grows again."""
    limits = limits_for(user)
    scope = scope_for(user)
    try:
        snapshot = guarded(_peek, user, scope, limits)
    except StoreUnavailable:
        return _budget_dict(limits, None)
    return _budget_dict(limits, snapshot)


def _peek(user: User, scope: str, limits: Limits) -> Snapshot:
    store = get_store()
    snapshot = store.peek(scope)
    if isinstance(snapshot, Snapshot) and snapshot.plan_slug == limits.plan_slug:
        return snapshot
    rebuild = snapshot is False
    _, seed, epoch = config_for(user, scope, rebuild=rebuild) if rebuild else (None, [], "")
    result = store.peek(scope, limits=limits, epoch=epoch or uuid.uuid4().hex[:8], seed=seed)
    assert isinstance(result, Snapshot)
    return result


def _budget_dict(limits: Limits, snapshot: Snapshot | None) -> dict[str, Any]:
    spec = window_spec()
    base = {
        "plan": {"slug": limits.plan_slug, "name": limits.plan_name},
        "window_seconds": spec.window_seconds,
        "limit": limits.tokens_per_window,
        "max_tokens_per_request": limits.max_tokens_per_request,
        "requests_per_minute": limits.requests_per_minute,
        "max_concurrent_requests": limits.max_concurrent_requests,
    }
    if snapshot is None:
        return {
            **base,
            "used": None,
            "reserved": None,
            "remaining": None,
            "debt": None,
            "reset_seconds": None,
            "requests_used": None,
            "in_flight": None,
            "degraded": True,
        }
    return {
        **base,
        "used": snapshot.used,
        "reserved": snapshot.reserved,
        # Usage above the estimate is charged even past the limit: what the window holds
        # beyond it is debt, shown on its own, so ``remaining`` never goes below 0.
        "remaining": max(snapshot.remaining, 0),
        "debt": max(-snapshot.remaining, 0),
        "reset_seconds": snapshot.reset_seconds,
        "requests_used": snapshot.requests_used if limits.requests_per_minute else None,
        "in_flight": snapshot.in_flight,
        "degraded": False,
    }


def reset_window(user: User) -> None:
    """Give the user's whole budget back now (admin action)."""
    get_store().reset(scope_for(user))
