"""Usage rollups: each batch of ledger rows summed per hour, user, team, plan and model.

``roll_up(rows)`` runs in the transaction that created ``rows`` (see ``quotas.engine.rows``):
only rows really created are added, so a re-delivered batch, whose rows already exist, adds
nothing, and a batch rolled back adds nothing either. Concurrent writers add to the same
bucket safely: one ``INSERT ... ON CONFLICT DO UPDATE`` adds to each bucket atomically
(PostgreSQL and SQLite; other databases lock the bucket's row and update it).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import F

from quotas.conf import quota_settings
from quotas.engine.runtime import per_process
from quotas.models import Plan, UsageRollup, UserQuota

__all__ = [
    "SUMMED",
    "BucketSums",
    "add_to_buckets",
    "bucket_key",
    "hour_of",
    "plans_of_users",
    "roll_up",
    "set_refusals",
]

SUMMED = ("requests", "tokens_in", "tokens_out", "tokens", "cost", "refusals")


@dataclass
class BucketSums:
    """One rollup bucket's dimensions and the figures to add to it."""

    hour: datetime
    user_id: int | None
    team_id: int | None
    plan_id: int | None
    model: str
    refused_by: str = ""
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUMMED, 0))

    @property
    def key(self) -> str:
        # A refusals bucket is named without its plan: its count is set, not added, and a
        # plan change within the hour must not make a second bucket holding the same count.
        plan = None if self.refused_by else self.plan_id
        return bucket_key(self.hour, self.user_id, self.team_id, plan, self.model, self.refused_by)


def bucket_key(
    hour: datetime,
    user_id: int | None,
    team_id: int | None,
    plan_id: int | None,
    model: str,
    refused_by: str = "",
) -> str:
    """The digest naming one bucket (a unique column: nullable dimensions would not be)."""
    text = f"{hour.timestamp():.0f}|{user_id}|{team_id}|{plan_id}|{model}|{refused_by}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def hour_of(moment: datetime) -> datetime:
    """The start of the hour (UTC) that ``moment`` (an aware datetime) falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def roll_up(rows: Iterable[Any]) -> int:
    """Add these newly created ledger rows (``UsageRecord`` instances, or any objects with
    their attributes: the ledger writer passes its insert's values) to their hourly buckets;
    returns the buckets touched. Call it inside the transaction that created the rows."""
    rows = list(rows)
    if not rows:
        return 0
    plans = plans_of_users({row.user_id for row in rows})
    buckets: dict[str, BucketSums] = {}
    for row in rows:
        bucket = BucketSums(
            hour_of(row.created_at), row.user_id, row.team_id, plans.get(row.user_id), row.model
        )
        bucket = buckets.setdefault(bucket.key, bucket)
        _add_row(bucket.sums, row)
    add_to_buckets(list(buckets.values()))
    return len(buckets)


def _add_row(sums: dict[str, int], row: Any) -> None:
    sums["requests"] += 1
    sums["tokens_in"] += row.prompt_tokens or 0
    sums["tokens_out"] += row.completion_tokens or 0
    sums["tokens"] += row.actual_tokens
    sums["cost"] += row.cost


def plans_of_users(user_ids: Iterable[int | None]) -> dict[int | None, int | None]:
    """The plan each user is on now (their own, else the default plan); ``None`` (anonymous
    clients) maps to the ``ANONYMOUS_PLAN``. One query (the default and anonymous plans are
    remembered for ``SHARED_PLANS_SECONDS``: they label rollups, they decide nothing)."""
    ids = {pk for pk in user_ids if pk is not None}
    default, anonymous = _shared_plans()
    own = dict(
        UserQuota.objects.filter(user_id__in=ids, plan__isnull=False).values_list(
            "user_id", "plan_id"
        )
    )
    plans: dict[int | None, int | None] = {pk: own.get(pk, default) for pk in ids}
    plans[None] = anonymous
    return plans


SHARED_PLANS_SECONDS = 30.0


class _SharedPlans:
    """The default and anonymous plans' ids, read again every ``SHARED_PLANS_SECONDS``."""

    def __init__(self) -> None:
        self.until = 0.0
        self.ids: tuple[int | None, int | None] = (None, None)

    def get(self) -> tuple[int | None, int | None]:
        if time.monotonic() >= self.until:
            slug = quota_settings.ANONYMOUS_PLAN
            plans = Plan.objects.values_list("pk", flat=True)
            default = plans.filter(is_default=True).first()
            self.ids = (default, plans.filter(slug=slug).first() if slug else None)
            self.until = time.monotonic() + SHARED_PLANS_SECONDS
        return self.ids


def _shared_plans() -> tuple[int | None, int | None]:
    # Per process, and forgotten with the runtime when settings change.
    return per_process("rollup_plans", _SharedPlans).get()


def add_to_buckets(buckets: list[BucketSums]) -> None:
    """Add each bucket's sums to its row (created at zero when missing), atomically."""
    _write(buckets, {name: "add" for name in SUMMED})


def set_refusals(buckets: list[BucketSums]) -> int:
    """Set each refusals bucket's count (created when missing); returns the buckets."""
    _write(buckets, {"refusals": "set"})
    return len(buckets)


def _write(buckets: list[BucketSums], how: dict[str, str]) -> None:
    buckets = sorted(buckets, key=lambda b: b.key)  # one lock order: no deadlock between two
    if connection.vendor in ("postgresql", "sqlite"):
        for start in range(0, len(buckets), 500):
            _upsert(buckets[start : start + 500], how)
    else:
        with transaction.atomic():
            for bucket in buckets:
                _write_locked(bucket, how)


_COLUMNS = ("bucket_key", "hour", "user_id", "team_id", "plan_id", "model", "refused_by", *SUMMED)


def _upsert(buckets: list[BucketSums], how: dict[str, str]) -> None:
    if not buckets:
        return
    quote = connection.ops.quote_name
    table = quote(UsageRollup._meta.db_table)
    row = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    updates = ", ".join(
        f"{quote(c)} = {table}.{quote(c)} + excluded.{quote(c)}"
        if mode == "add"
        else f"{quote(c)} = excluded.{quote(c)}"
        for c, mode in how.items()
    )
    sql = (
        f"INSERT INTO {table} ({', '.join(quote(c) for c in _COLUMNS)}) "
        f"VALUES {', '.join([row] * len(buckets))} "
        f"ON CONFLICT ({quote('bucket_key')}) DO UPDATE SET {updates}"
    )
    params: list[object] = []
    for b in buckets:
        params += [b.key, _db_moment(b.hour), b.user_id, b.team_id, b.plan_id, b.model]
        params += [b.refused_by, *(b.sums[name] for name in SUMMED)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _db_moment(moment: datetime) -> object:
    return UsageRollup._meta.get_field("hour").get_db_prep_value(moment, connection)


def _write_locked(bucket: BucketSums, how: dict[str, str]) -> None:
    rollup, _ = UsageRollup.objects.select_for_update().get_or_create(
        bucket_key=bucket.key,
        defaults={
            "hour": bucket.hour,
            "user_id": bucket.user_id,
            "team_id": bucket.team_id,
            "plan_id": bucket.plan_id,
            "model": bucket.model,
            "refused_by": bucket.refused_by,
        },
    )
    UsageRollup.objects.filter(pk=rollup.pk).update(
        **{
            name: F(name) + bucket.sums[name] if mode == "add" else bucket.sums[name]
            for name, mode in how.items()
        }
    )
