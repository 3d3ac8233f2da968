"""Ledger retention: ``UsageRecord`` rows older than ``QUOTAS["LEDGER_RETENTION_DAYS"]`` are
deleted in batches (the Celery beat task ``quotas.tasks.prune_ledger``); their hourly rollups
(``UsageRollup``) stay, so dashboards and users' history keep every hour.

Windows are rebuilt from the ledger after Redis loses its data, and audits compare against it:
keep at least as many days as the longest window or calendar period of any limit (31 days for
a monthly limit).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from quotas.conf import quota_settings
from quotas.models import UsageRecord

__all__ = ["PRUNE_BATCH_SIZE", "prune_ledger", "retention_cutoff"]

# Rows deleted per statement: short transactions, so writers and the admin never wait long.
PRUNE_BATCH_SIZE = 5000


def retention_cutoff(now: datetime | None = None) -> datetime | None:
    """Rows reserved before this moment are past retention; ``None``: the ledger is kept."""
    days = quota_settings.LEDGER_RETENTION_DAYS
    if days is None:
        return None
    return (now or timezone.now()) - timedelta(days=days)


def prune_ledger(now: datetime | None = None, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete the ledger rows past retention, ``batch_size`` at a time; returns how many.
    Nothing when ``LEDGER_RETENTION_DAYS`` is ``None`` (the default: keep everything)."""
    cutoff = retention_cutoff(now)
    if cutoff is None:
        return 0
    deleted = 0
    while True:
        count = _delete_batch(cutoff, batch_size)
        deleted += count
        if count < batch_size:
            return deleted


def _delete_batch(cutoff: datetime, batch_size: int) -> int:
    old = UsageRecord.objects.filter(created_at__lt=cutoff).order_by("created_at")
    ids = list(old.values_list("pk", flat=True)[:batch_size])
    if not ids:
        return 0
    with transaction.atomic():
        count, _ = UsageRecord.objects.filter(pk__in=ids).delete()
    return count
