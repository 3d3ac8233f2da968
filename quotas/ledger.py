"""The reconciliation API: the ledger (the source of truth) and the Redis windows kept in
step with it. ``quotas.tasks`` wraps these in Celery tasks and the management commands call
them; every one is idempotent, so a re-delivered task changes nothing.

- ``flush_ledger``: write the ledger rows waiting in the Redis outboxes, and expire the
  reservations never settled within their TTL (charged at their estimate);
- ``write_usage``: write the rows of a batch of usage records (what a settle sends);
- ``audit_window(s)``: repair drift between a window and the ledger;
- ``rebuild_window(s)``: seed lost windows from the ledger now;
- ``prune_ledger``: delete rows past ``LEDGER_RETENTION_DAYS`` (their rollups stay);
- ``backfill_rollups``: roll up a ledger written before rollups existed.

A facade over ``quotas.engine.reconcile``, ``rows``, ``retention`` and ``backfill``.
"""

from __future__ import annotations

from quotas.engine.backfill import backfill_cutoff, backfill_rollups
from quotas.engine.reconcile import (
    SCAN_EVERY_SECONDS,
    SETTLE_GRACE_SECONDS,
    AuditOutcome,
    audit_window,
    audit_windows,
    flush_ledger,
    flush_scope,
    rebuild_window,
    rebuild_windows,
)
from quotas.engine.retention import prune_ledger
from quotas.engine.rows import write_usage

__all__ = [
    "SCAN_EVERY_SECONDS",
    "SETTLE_GRACE_SECONDS",
    "AuditOutcome",
    "audit_window",
    "audit_windows",
    "backfill_cutoff",
    "backfill_rollups",
    "flush_ledger",
    "flush_scope",
    "prune_ledger",
    "rebuild_window",
    "rebuild_windows",
    "write_usage",
]
