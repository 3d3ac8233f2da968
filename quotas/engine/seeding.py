"""Rebuilding counters Redis lost (or never had) from the ledger, so a Redis restart never
hands every user a fresh budget: each counter is seeded with the ledger's usage still inside
its window, in the buckets it was charged to."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from django.db import transaction
from django.db.models import QuerySet

from quotas.conf import quota_settings
from quotas.core.decisions import Counter
from quotas.core.limits import Limit, Metric, Scope, Window
from quotas.core.types import WindowSpec
from quotas.engine import dispatch
from quotas.engine.runtime import now_ms
from quotas.models import UsageRecord

__all__ = ["counter_seeds", "ledger_seed", "limit_seed", "new_epoch"]

logger = logging.getLogger("quotas")

Seeds = dict[int, tuple[str, list[tuple[int, int]]]]


def new_epoch() -> str:
    """The epoch stamped on a counter built or rebuilt now."""
    return uuid.uuid4().hex[:8]


def counter_seeds(
    scope: str, team: int | None, counters: Sequence[Counter], unbuilt: Iterable[int]
) -> Seeds:
    """The ledger's figures (and a new epoch) for each unbuilt counter (1-based indexes into
    ``counters``) of quota key ``scope`` (in team ``team``). A rebuilt primary window gets
    an audit once the usage in flight has landed."""
    at = now_ms()
    seeds: Seeds = {}
    for index in unbuilt:
        limit = counters[index - 1].limit
        pairs = limit_seed(limit, scope, team, at)
        seeds[index] = (new_epoch(), pairs)
        if limit.counter == "w" and pairs:
            logger.info("quotas: rebuilt the window of %s from the ledger", scope)
            transaction.on_commit(lambda: _schedule_audit(scope))
    return seeds


def limit_seed(limit: Limit, scope: str, team: int | None, at_ms: int) -> list[tuple[int, int]]:
    """Units per bucket (a calendar period's start, for a calendar limit) still counted by
    ``limit``'s counter for ``scope`` (or its team, or all traffic), from the ledger."""
    window = limit.window
    if window.is_sliding:
        since = at_ms - window.window_ms - window.bucket_ms  # a bucket counts until its end
    else:
        since = window.boundaries(at_ms)[1]
    rows = _rows(limit, scope, team).filter(created_at__gt=_moment(since - 1))
    totals: dict[int, int] = {}
    for created_at, tokens, cost in rows.values_list("created_at", "actual_tokens", "cost"):
        moment = int(created_at.timestamp() * 1000)
        bucket = moment // window.bucket_ms if window.is_sliding else since
        units = {Metric.TOKENS: tokens, Metric.COST: cost}.get(limit.metric, 1)
        totals[bucket] = totals.get(bucket, 0) + units
    return sorted(totals.items())


def _rows(limit: Limit, scope: str, team: int | None) -> QuerySet[UsageRecord]:
    rows = UsageRecord.objects.all()
    if limit.scope is Scope.USER:
        rows = rows.filter(scope=scope)
    elif limit.scope is Scope.TEAM:
        rows = rows.filter(team_id=team)
    if limit.model:
        rows = rows.filter(model__regex=_glob_regex(limit.model))
    return rows


def _glob_regex(glob: str) -> str:
    """A model glob as a regular expression both PostgreSQL and SQLite's Python ``re`` read."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in glob)
    return f"^{body}$"


def _moment(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def ledger_seed(scope: str, spec: WindowSpec, now_ms: int) -> list[tuple[int, int]]:
    """Tokens per bucket still live in a user's primary window, from the ledger."""
    hour = Window.sliding(spec.window_ms / 1000, spec.bucket_ms / 1000)
    limit = Limit(Scope.USER, Metric.TOKENS, 1, hour, counter="w")
    return limit_seed(limit, scope, None, now_ms)


def _schedule_audit(scope: str) -> None:
    """Audit a rebuilt window once the usage in flight at the rebuild has landed.

    A rebuild reads the ledger as it stands; rows other processes are still writing (requests
    served while their circuit breakers were open) are missing from it. Every breaker probes
    within ``BREAKER_RESET_SECONDS``, so an audit a little later sees them all. If the broker
    cannot take the task, the periodic ``audit_windows`` repairs the window instead.
    """
    countdown = 2 * quota_settings.BREAKER_RESET_SECONDS + 5
    try:
        dispatch.send(dispatch.AUDIT_WINDOW, scope, countdown=countdown)
    except Exception:  # no broker (or no task queue): the periodic audit will get there
        logger.warning("quotas: could not schedule the audit of rebuilt window %s", scope)
