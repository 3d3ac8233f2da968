"""What the dashboard shows, read from the hourly rollups in a few grouped queries: the work
is bounded by the hours shown and the number of plans, models, users and teams, never by the
ledger's size. Live budgets (users near their limit) come from ``services.budget_for`` for a
bounded number of the most active users."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.utils import timezone

from quotas import services
from quotas.conf import quota_settings
from quotas.exceptions import QuotaError
from quotas.models import Plan, Team, UsageRollup

__all__ = [
    "NEAR_LIMIT_CANDIDATES",
    "Breakdown",
    "Periods",
    "dollars",
    "near_limit",
    "overview",
    "per_user",
    "periods",
    "top_spenders",
]

# The most active users of the last hour whose live budgets are read (one Redis read each).
NEAR_LIMIT_CANDIDATES = 25
# Series per chart; the rest are summed into "other".
TOP_SERIES = 5
SUMS = ("requests", "tokens_in", "tokens_out", "tokens", "cost", "refusals")


def dollars(micro: int) -> str:
    """Micro-dollars as dollars: ``$1,234.56``; amounts under a cent keep four decimals."""
    if 0 < micro < 10_000:
        return f"${micro / 1_000_000:.4f}"
    return f"${micro / 1_000_000:,.2f}"


@dataclass(frozen=True)
class Periods:
    """The buckets shown: the last 24 hours, and the last 30 days in the calendar zone."""

    hours: list[datetime]
    days: list[datetime]
    zone: ZoneInfo

    @property
    def since(self) -> datetime:
        return min(self.hours[0], self.days[0])

    def hour_index(self, hour: datetime) -> int | None:
        n = int((hour - self.hours[0]).total_seconds() // 3600)
        return n if 0 <= n < len(self.hours) else None

    def day_index(self, hour: datetime) -> int | None:
        local = hour.astimezone(self.zone).date()
        n = (local - self.days[0].astimezone(self.zone).date()).days
        return n if 0 <= n < len(self.days) else None


def periods(now: datetime | None = None) -> Periods:
    """The last 24 hours (this one included) and 30 days (today included)."""
    now = (now or timezone.now()).astimezone(UTC)
    last = now.replace(minute=0, second=0, microsecond=0)
    zone = ZoneInfo(services.calendar_time_zone())
    today = now.astimezone(zone).date()
    days = [
        datetime.combine(today - timedelta(days=29 - n), time(0), tzinfo=zone).astimezone(UTC)
        for n in range(30)
    ]
    return Periods([last - timedelta(hours=23 - n) for n in range(24)], days, zone)


@dataclass
class Breakdown:
    """Per bucket and per name (a plan or a model): one figure's values."""

    size: int
    values: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, index: int, value: int) -> None:
        self.values.setdefault(name, [0] * self.size)[index] += value

    def top(self, count: int = TOP_SERIES) -> list[tuple[str, list[int]]]:
        """The ``count`` largest series, the rest summed as ``"other"``."""
        ranked = sorted(self.values.items(), key=lambda item: -sum(item[1]))
        kept, rest = ranked[:count], ranked[count:]
        if rest:
            kept.append(("other", [sum(col) for col in zip(*(v for _, v in rest), strict=True)]))
        return kept


def overview(span: Periods) -> dict[str, Any]:
    """Totals and breakdowns (tokens and cost, per plan and per model) of both periods, from
    one grouped query over the rollups."""
    rows = (
        UsageRollup.objects.filter(hour__gte=span.since)
        .order_by()
        .values("hour", "plan_id", "model")
        .annotate(**{name: Sum(name) for name in SUMS})
    )
    plans = dict(Plan.objects.values_list("pk", "name"))
    result: dict[str, Any] = {}
    for period, size in (("day", len(span.hours)), ("month", len(span.days))):
        result[period] = {
            "totals": dict.fromkeys(SUMS, 0),
            **{
                f"{m}_by_{d}": Breakdown(size)
                for m in ("tokens", "cost")
                for d in ("plan", "model")
            },
        }
    for row in rows:
        hour = row["hour"].astimezone(UTC)
        names = {"plan": plans.get(row["plan_id"], "(no plan)"), "model": row["model"] or "(none)"}
        for period, index in (("day", span.hour_index(hour)), ("month", span.day_index(hour))):
            if index is not None:
                _add(result[period], row, names, index)
    return result


def _add(period: dict[str, Any], row: dict[str, Any], names: dict[str, str], i: int) -> None:
    for name in SUMS:
        period["totals"][name] += int(row[name] or 0)
    for metric in ("tokens", "cost"):
        for dimension, label in names.items():
            period[f"{metric}_by_{dimension}"].add(label, i, int(row[metric] or 0))


def top_spenders(since: datetime, count: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The users and the teams with the highest cost since ``since`` (then the most tokens)."""
    sums = {name: Sum(name) for name in ("requests", "tokens", "cost")}
    base = UsageRollup.objects.filter(hour__gte=since).order_by()
    users = list(
        base.filter(user__isnull=False).values("user_id").annotate(**sums)
        .order_by("-cost", "-tokens")[:count]
    )  # fmt: skip
    teams = list(
        base.filter(team__isnull=False).values("team_id").annotate(**sums)
        .order_by("-cost", "-tokens")[:count]
    )  # fmt: skip
    people = get_user_model().objects.in_bulk([u["user_id"] for u in users])
    crews = Team.objects.in_bulk([t["team_id"] for t in teams])
    for entry in users:
        entry.update(user=people.get(entry["user_id"]), cost_shown=dollars(entry["cost"] or 0))
    for entry in teams:
        entry.update(team=crews.get(entry["team_id"]), cost_shown=dollars(entry["cost"] or 0))
    return {"users": users, "teams": teams}


def near_limit(now: datetime, threshold: float | None = None) -> list[dict[str, Any]]:
    """Users whose live usage of a limit is at or above ``threshold`` (``ALERT_THRESHOLD``
    by default), among the ``NEAR_LIMIT_CANDIDATES`` users who used the most tokens in the
    last two hours; the fullest first."""
    share = float(quota_settings.ALERT_THRESHOLD if threshold is None else threshold)
    since = now - timedelta(hours=2)
    active = (
        UsageRollup.objects.filter(hour__gte=since, user__isnull=False).order_by()
        .values("user_id").annotate(tokens=Sum("tokens")).order_by("-tokens")
    )  # fmt: skip
    ids = [row["user_id"] for row in active[:NEAR_LIMIT_CANDIDATES]]
    found: list[dict[str, Any]] = []
    for user in get_user_model().objects.in_bulk(ids).values():
        found += _full_limits(user, share)
    return sorted(found, key=lambda entry: -entry["share"])


def _full_limits(user: Any, share: float) -> Iterable[dict[str, Any]]:
    try:
        budget = services.budget_for(user)
    except QuotaError:
        return []
    full = []
    for limit in budget.get("limits", []):
        used, allowed = limit.get("used"), limit.get("limit") or 0
        if used is not None and allowed > 0 and used / allowed >= share:
            ratio = used / allowed
            full.append({"user": user, "limit": limit, "share": ratio, "percent": int(ratio * 100)})
    return full


def per_user(since: datetime, search: str = "") -> Any:
    """Every user with usage since ``since`` (default-plan users too): their sums, the
    highest cost first (a queryset of dicts, for a paginator)."""
    rows = UsageRollup.objects.filter(hour__gte=since, user__isnull=False)
    if search:
        rows = rows.filter(user__username__icontains=search)
    sums = {name: Sum(name) for name in ("requests", "tokens", "cost", "refusals")}
    return (
        rows.order_by().values("user_id", "user__username").annotate(**sums)
        .order_by("-cost", "-tokens", "user_id")
    )  # fmt: skip
