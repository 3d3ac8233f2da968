"""Refusals in the usage rollups: each 429 is counted per hour, user, team, model and the
limit that refused, and the counts are copied into ``UsageRollup`` rows (``refused_by``).

A refusal adds to this process's batch (no Redis call in the request: a refusal storm costs
Redis one pipelined round trip per batch, every ``LEDGER_BATCH_SECONDS``, not one per
refusal; with ``LEDGER_BATCH_SECONDS = 0`` it is sent at once). The counts live in Redis,
one hash per hour, kept three days. ``roll_up_refusals`` (the beat task
``quotas.tasks.roll_up_refusals``, every minute) *sets* each rollup's count to the hour's
count, so running it twice, or concurrently, never counts a refusal twice. The counts are
statistics: a batch lost with its process, or sent while Redis was down, is not retried.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth import get_user_model

from quotas.backends.refusal_counts import add_refusals, refusal_counts
from quotas.conf import quota_settings
from quotas.engine.batching import Batcher, batch_interval
from quotas.engine.rollups import BucketSums, plans_of_users, set_refusals
from quotas.engine.runtime import get_store, guarded, now_ms
from quotas.exceptions import QuotaExceeded, StoreUnavailable
from quotas.models import Team

__all__ = ["HOUR_MS", "limit_label", "note_refusal", "roll_up_refusals"]

logger = logging.getLogger("quotas")
HOUR_MS = 3_600_000
KEEP_SECONDS = 3 * 86400

Refusal = tuple[int, str]  # (hour start in ms, the hash field naming who and which limit)


def limit_label(exc: QuotaExceeded) -> str:
    """The refusing limit as the dashboard names it, e.g. ``"user tokens per hour"``."""
    label = f"{exc.limit_scope} {exc.scope}"
    if exc.window:
        label += f" per {exc.window}"
    return f"{label} ({exc.model})" if exc.model else label


def note_refusal(
    user_id: int | None, team_id: int | None, model: str, exc: QuotaExceeded, at_ms: int
) -> None:
    """Count one refusal (never raises: counting must not change the 429)."""
    try:
        field = json.dumps([user_id, team_id, model[:200], limit_label(exc)[:100]])
        refusal = (at_ms - at_ms % HOUR_MS, field)
        if quota_settings.LEDGER_BATCH_SECONDS > 0:
            refusal_batcher().add(refusal)
        else:
            _send([refusal])
    except Exception:
        logger.debug("quotas: a refusal was not counted", exc_info=True)


def refusal_batcher() -> Batcher[Refusal]:
    global _batcher
    if _batcher is None:
        _batcher = Batcher(
            _send,
            interval=lambda: batch_interval(quota_settings.LEDGER_BATCH_SECONDS),
            size=lambda: int(quota_settings.LEDGER_BATCH_SIZE),
            name="quotas-refusal-batch",
        )
    return _batcher


_batcher: Batcher[Refusal] | None = None


def _send(refusals: list[Refusal]) -> None:
    store = get_store()
    try:
        guarded(add_refusals, store.client, store.prefix, Counter(refusals), KEEP_SECONDS)
    except StoreUnavailable:
        logger.info("quotas: Redis unavailable; %d refusals not counted", len(refusals))


def roll_up_refusals(hours: int = 2, now: int | None = None) -> int:
    """Copy the refusal counts of the last ``hours`` hours (this one included) into the
    rollups; returns the buckets written. Idempotent: counts are set, not added."""
    current = (now_ms() if now is None else now) // HOUR_MS * HOUR_MS
    store = get_store()
    written = 0
    for hour_ms in range(current - (hours - 1) * HOUR_MS, current + HOUR_MS, HOUR_MS):
        counts = guarded(refusal_counts, store.client, store.prefix, hour_ms)
        written += set_refusals(_buckets(hour_ms, counts))
    return written


def _buckets(hour_ms: int, counts: dict[str, int]) -> list[BucketSums]:
    hour = datetime.fromtimestamp(hour_ms / 1000, tz=UTC)
    fields: list[tuple[list[Any], int]] = []
    for name, count in counts.items():
        try:
            fields.append((list(json.loads(name)), count))
        except (ValueError, TypeError):
            continue
    users, teams = _existing({f[0] for f, _ in fields}, {f[1] for f, _ in fields})
    plans = plans_of_users(users)
    buckets = []
    for (user_id, team_id, model, label), count in fields:
        user = user_id if user_id in users else None  # a user or team deleted since
        team = team_id if team_id in teams else None
        bucket = BucketSums(hour, user, team, plans.get(user), model, refused_by=label)
        bucket.sums["refusals"] = count
        buckets.append(bucket)
    return buckets


def _existing(user_ids: set[Any], team_ids: set[Any]) -> tuple[set[int], set[int]]:
    users = {pk for pk in user_ids if isinstance(pk, int)}
    teams = {pk for pk in team_ids if isinstance(pk, int)}
    return (
        set(get_user_model().objects.filter(pk__in=users).values_list("pk", flat=True)),
        set(Team.objects.filter(pk__in=teams).values_list("pk", flat=True)),
    )
