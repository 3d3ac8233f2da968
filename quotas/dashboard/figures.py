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
from django.db.models.functions import TruncDay
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
    "month_rows",
    "near_limit",
    "overview",
    "per_user",
    "periods",
    "refusals_by_limit",
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
        shown = [(name, values) for name, values in self.values.items() if any(values)]
        ranked = sorted(shown, key=lambda item: -sum(item[1]))
        kept, rest = ranked[:count], ranked[count:]
        if rest:
            kept.append(("other", [sum(col) for col in zip(*(v for _, v in rest), strict=True)]))
        return kept


def overview(span: Periods, count: int = 10) -> dict[str, Any]:
    """Totals and breakdowns (tokens and cost, per plan and per model) of both periods, and
    the ``count`` top users and teams by spend over 30 days: a small query for the last day,
    and two over the 30 days' rollups (see ``month_rows``)."""
    plans = dict(Plan.objects.values_list("pk", "name"))
    hours = (
        UsageRollup.objects.filter(hour__gte=span.hours[0]).order_by()
        .values("hour", "plan_id", "model").annotate(**{name: Sum(name) for name in SUMS})
    )  # fmt: skip
    day = _period(len(span.hours))
    for row in hours:
        _add(day, row, plans, span.hour_index(row["hour"].astimezone(UTC)))
    days, spenders = month_rows(span)
    month = _period(len(span.days))
    for row in days:
        _add(month, row, plans, span.day_index(row["day"]))
    return {"day": day, "month": month, "top": top_spenders(spenders, count)}


def month_rows(span: Periods) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The 30 days' rollups summed per (day, plan, model), the days bucketed by the
    database, and per (user, team). (One scan with ``GROUPING SETS`` measured slower on
    PostgreSQL than these two grouped queries.)"""
    since = span.days[0]
    days = (
        UsageRollup.objects.filter(hour__gte=since).order_by()
        .annotate(day=TruncDay("hour", tzinfo=span.zone))
        .values("day", "plan_id", "model").annotate(**{name: Sum(name) for name in SUMS})
    )  # fmt: skip
    spenders = (
        UsageRollup.objects.filter(hour__gte=since).order_by().values("user_id", "team_id")
        .annotate(requests=Sum("requests"), tokens=Sum("tokens"), cost=Sum("cost"))
    )  # fmt: skip
    return list(days), list(spenders)


def _period(size: int) -> dict[str, Any]:
    breakdowns = {
        f"{m}_by_{d}": Breakdown(size) for m in ("tokens", "cost") for d in ("plan", "model")
    }
    return {"totals": dict.fromkeys(SUMS, 0), **breakdowns}


def _add(period: dict[str, Any], row: dict[str, Any], plans: dict[int, str], i: int | None) -> None:
    if i is None:
        return
    for name in SUMS:
        period["totals"][name] += int(row[name] or 0)
    names = {"plan": plans.get(row["plan_id"], "(no plan)"), "model": row["model"] or "(none)"}
    for metric in ("tokens", "cost"):
        for dimension, label in names.items():
            period[f"{metric}_by_{dimension}"].add(label, i, int(row[metric] or 0))


def top_spenders(rows: Iterable[dict[str, Any]], count: int = 10) -> dict[str, list[Any]]:
    """The users and the teams with the highest cost (then the most tokens) among ``rows``
    (sums per user and team)."""
    users: dict[int, dict[str, int]] = {}
    teams: dict[int, dict[str, int]] = {}
    for row in rows:
        for key, table in (("user_id", users), ("team_id", teams)):
            if row[key] is not None:
                entry = table.setdefault(row[key], {"requests": 0, "tokens": 0, "cost": 0})
                for name in entry:
                    entry[name] += int(row[name] or 0)
    return {
        "users": _ranked(users, count, get_user_model(), "user"),
        "teams": _ranked(teams, count, Team, "team"),
    }


def _ranked(
    sums: dict[int, dict[str, int]], count: int, model: Any, name: str
) -> list[dict[str, Any]]:
    top = sorted(sums.items(), key=lambda item: (-item[1]["cost"], -item[1]["tokens"], item[0]))[
        :count
    ]
    objects = model.objects.in_bulk([pk for pk, _ in top])
    return [
        {**figures, f"{name}_id": pk, name: objects.get(pk), "cost_shown": dollars(figures["cost"])}
        for pk, figures in top
    ]


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


def refusals_by_limit(since: datetime) -> list[dict[str, Any]]:
    """Refusals (429s) since ``since`` per limit that refused, the most first."""
    rows = (
        UsageRollup.objects.filter(hour__gte=since).exclude(refused_by="").order_by()
        .values("refused_by").annotate(refusals=Sum("refusals")).order_by("-refusals")
    )  # fmt: skip
    return [{"limit": row["refused_by"], "refusals": row["refusals"]} for row in rows[:20]]


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
