"""Rolling up a ledger written before rollups existed (an upgrade): ``backfill_rollups``,
run once by ``manage.py quotas_backfill_rollups``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.db.models import Count, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from quotas.engine.rollups import BucketSums, add_to_buckets, hour_of, plans_of_users
from quotas.models import UsageRecord, UsageRollup

__all__ = ["backfill_cutoff", "backfill_rollups"]


def backfill_cutoff() -> datetime:
    """Ledger rows reserved before this hour have no rollup: the hour of the earliest rollup
    (the worker rolled up everything from then on), or this hour when there is none."""
    first = UsageRollup.objects.order_by("hour").values_list("hour", flat=True).first()
    return first if first is not None else hour_of(timezone.now())


def backfill_rollups() -> int:
    """Roll up every ledger row reserved before ``backfill_cutoff()``, in one transaction
    (grouped by the database: the work grows with the buckets, not the rows); returns the
    buckets written. Running it again finds nothing left: the cutoff moves to the earliest
    row rolled up. Rows of the cutoff hour itself that predate the upgrade stay unrolled."""
    rows = (
        UsageRecord.objects.filter(created_at__lt=backfill_cutoff()).order_by()
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .values("hour", "user_id", "team_id", "model")
        .annotate(
            requests=Count("pk"), tokens_in=Sum("prompt_tokens"),
            tokens_out=Sum("completion_tokens"), tokens=Sum("actual_tokens"), cost=Sum("cost"),
        )
    )  # fmt: skip
    with transaction.atomic():
        groups = list(rows)
        plans = plans_of_users({row["user_id"] for row in groups})
        buckets = [_bucket(row, plans) for row in groups]
        add_to_buckets(buckets)
    return len(buckets)


def _bucket(row: dict[str, Any], plans: dict[int | None, int | None]) -> BucketSums:
    user = row["user_id"]
    hour = row["hour"].astimezone(UTC)
    bucket = BucketSums(hour, user, row["team_id"], plans.get(user), str(row["model"]))
    for name in ("requests", "tokens_in", "tokens_out", "tokens", "cost"):
        bucket.sums[name] = int(row[name] or 0)
    return bucket
