"""Building a user's window in Redis: the limits it decides with and, when Redis lost the
window (or never had it), the ledger's figures it is seeded with, so a Redis restart never
hands every user a fresh budget."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from django.db import transaction

from quotas.conf import quota_settings
from quotas.core.types import Limits, WindowSpec
from quotas.engine import dispatch
from quotas.engine.plans import User, limits_for
from quotas.engine.runtime import now_ms, window_spec
from quotas.models import UsageRecord

__all__ = ["config_for", "ledger_seed"]

logger = logging.getLogger("quotas")


def ledger_seed(scope: str, spec: WindowSpec, now_ms: int) -> list[tuple[int, int]]:
    """Tokens per bucket still live in the window, from the ledger (to rebuild a lost window).

    A bucket counts until its end is a window old, so one bucket more than the window is read.
    """
    since = datetime.fromtimestamp((now_ms - spec.window_ms - spec.bucket_ms) / 1000, tz=UTC)
    totals: dict[int, int] = {}
    rows = UsageRecord.objects.filter(scope=scope, created_at__gt=since)
    for created_at, tokens in rows.values_list("created_at", "actual_tokens").iterator():
        bucket = spec.bucket_of(int(created_at.timestamp() * 1000))
        totals[bucket] = totals.get(bucket, 0) + tokens
    return sorted(totals.items())


def config_for(
    user: User | None, scope: str, *, rebuild: bool
) -> tuple[Limits, list[tuple[int, int]], str]:
    """The user's limits, the ledger's seed when the window must be rebuilt (``rebuild``), and
    a new epoch for it. A rebuilt window gets an audit once the usage in flight has landed."""
    limits = limits_for(user)
    seed = ledger_seed(scope, window_spec(), now_ms()) if rebuild else []
    if rebuild and seed:
        logger.info("quotas: rebuilt the window of %s from the ledger", scope)
        transaction.on_commit(lambda: _schedule_audit(scope))
    return limits, seed, uuid.uuid4().hex[:8]


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
