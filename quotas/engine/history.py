"""Usage history from the hourly rollups (never the ledger): a user's last day in hours, or
last 30 days in days, for ``GET /quotas/me/usage/`` and the admin's user page.

Days start at midnight in the calendar-limit time zone (``QUOTAS["TIME_ZONE"]``, else
Django's). Rollups are hours of UTC, so in a zone whose offset is not a whole number of hours
an hour's usage counts in the day its first minute falls in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db.models import Q, Sum
from django.utils import timezone

from quotas.engine.config import time_zone
from quotas.engine.rollups import SUMMED, hour_of
from quotas.models import UsageRollup

__all__ = ["PERIODS", "UsageBucket", "hourly_sums", "usage_history"]

# A period's name: (its buckets, how many, newest last).
PERIODS = {"day": ("hour", 24), "month": ("day", 30)}


@dataclass(frozen=True)
class UsageBucket:
    """One hour's or day's usage: ``[start, end)``; ``cost`` in micro-dollars."""

    start: datetime
    end: datetime
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens: int = 0
    cost: int = 0
    refusals: int = 0


def usage_history(user_id: int, period: str, now: datetime | None = None) -> list[UsageBucket]:
    """The user's usage over ``period`` (``"day"``: the last 24 hours, this one included;
    ``"month"``: the last 30 days, today included), oldest first, empty buckets included.
    Raises ``ValueError`` for another period."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    now = now or timezone.now()
    owner = Q(user_id=user_id)
    if period == "day":
        return hourly_history(owner, now)
    return _daily(owner, now)


def hourly_history(where: Q, now: datetime, hours: int = 24) -> list[UsageBucket]:
    """Usage of the rollups matching ``where`` in each of the last ``hours`` hours."""
    last = hour_of(now)
    first = last - timedelta(hours=hours - 1)
    sums = hourly_sums(where & Q(hour__gte=first, hour__lte=last))
    return [
        UsageBucket(start, start + timedelta(hours=1), **sums.get(start, {}))
        for start in (first + timedelta(hours=n) for n in range(hours))
    ]


def _daily(where: Q, now: datetime, days: int = 30) -> list[UsageBucket]:
    zone = ZoneInfo(time_zone())
    today = now.astimezone(zone).date()
    first = today - timedelta(days=days - 1)
    totals: dict[date, dict[str, int]] = {}
    for hour, sums in hourly_sums(where & Q(hour__gte=_midnight(first, zone))).items():
        day = totals.setdefault(hour.astimezone(zone).date(), dict.fromkeys(SUMMED, 0))
        for name in SUMMED:
            day[name] += sums[name]
    return [
        UsageBucket(
            _midnight(day, zone), _midnight(day + timedelta(days=1), zone), **totals.get(day, {})
        )
        for day in (first + timedelta(days=n) for n in range(days))
    ]


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def hourly_sums(where: Q) -> dict[datetime, dict[str, int]]:
    """The rollups matching ``where`` added up per hour (one grouped query)."""
    rows = (
        UsageRollup.objects.filter(where)
        .order_by()
        .values("hour")
        .annotate(**{name: Sum(name) for name in SUMMED})
    )
    return {
        row["hour"].astimezone(UTC): {name: int(row[name] or 0) for name in SUMMED} for row in rows
    }
