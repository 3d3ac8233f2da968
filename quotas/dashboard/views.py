"""The usage dashboard's admin pages: the overview (``/admin/quotas/dashboard/``), usage by
user (``users/``) and one user's page (``user/<id>/``). Staff with
``quotas.view_dashboard`` (superusers have it); read-only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from quotas import services
from quotas.dashboard import figures
from quotas.dashboard.charts import Chart, Series, stacked_bars
from quotas.dashboard.figures import dollars
from quotas.exceptions import QuotaError
from quotas.models import UsageRecord

__all__ = ["DashboardAdmin"]

USERS_PER_PAGE = 50
RECENT_RECORDS = 20


def _tokens(value: int) -> str:
    return f"{value:,}"


class DashboardAdmin(admin.ModelAdmin):
    """The dashboard's pages, in place of a change list (the model is a proxy of the
    rollups: nothing here can be added, changed or deleted)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("users/", wrap(self.users_view), name="quotas_dashboard_users"),
            path("user/<int:user_id>/", wrap(self.user_view), name="quotas_dashboard_user"),
            path("", wrap(self.changelist_view), name="quotas_dashboard_changelist"),
        ]

    def _check(self, request: HttpRequest) -> None:
        # Before any figure is read: a refused request costs no query.
        if not self.has_view_permission(request):
            raise PermissionDenied

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "app_label": self.model._meta.app_label,
            **extra,
        }

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        self._check(request)
        now = timezone.now()
        span = figures.periods(now)
        data = figures.overview(span)
        context = self._context(
            request,
            "Usage dashboard",
            day=_period(data["day"], [f"{h.astimezone(span.zone):%H}h" for h in span.hours], 3),
            month=_period(
                data["month"], [f"{d.astimezone(span.zone):%d %b}" for d in span.days], 5
            ),
            top=data["top"],
            near=figures.near_limit(now),
            refusals=figures.refusals_by_limit(span.hours[0]),
            near_candidates=figures.NEAR_LIMIT_CANDIDATES,
            health=services.health(),
            zone=span.zone.key,
        )
        return TemplateResponse(request, "admin/quotas/dashboard.html", context)

    def users_view(self, request: HttpRequest) -> HttpResponse:
        self._check(request)
        since = figures.periods().days[0]
        search = request.GET.get("q", "")[:150]
        page = Paginator(figures.per_user(since, search), USERS_PER_PAGE).get_page(
            request.GET.get("p")
        )
        for row in page:
            row["cost_shown"] = dollars(row["cost"] or 0)
        context = self._context(request, "Usage by user (last 30 days)", page=page, q=search)
        return TemplateResponse(request, "admin/quotas/dashboard_users.html", context)

    def user_view(self, request: HttpRequest, user_id: int) -> HttpResponse:
        self._check(request)
        context = self._context(request, "")
        user = get_object_or_404(get_user_model(), pk=user_id)
        hours = services.usage_history(user.pk, "day")
        zone = figures.periods().zone
        context.update(
            title=f"Usage of {user}",
            subject=user,
            budget=_budget(user),
            chart=_user_chart(hours, [f"{b.start.astimezone(zone):%H}h" for b in hours]),
            day=_sums(hours),
            records=UsageRecord.objects.filter(user=user).order_by("-created_at")[:RECENT_RECORDS],
        )
        return TemplateResponse(request, "admin/quotas/dashboard_user.html", context)


def _period(data: dict[str, Any], labels: list[str], every: int) -> dict[str, Any]:
    charts: list[tuple[str, Chart]] = []
    for metric, fmt in (("tokens", _tokens), ("cost", dollars)):
        for dimension in ("plan", "model"):
            title = f"{'Tokens' if metric == 'tokens' else 'Cost'} by {dimension}"
            series = [Series(n, v) for n, v in data[f"{metric}_by_{dimension}"].top()]
            charts.append((title, stacked_bars(title, labels, series, fmt=fmt, every=every)))
    totals = data["totals"]
    return {"charts": charts, "totals": totals, "cost": dollars(totals["cost"])}


def _budget(user: Any) -> dict[str, Any]:
    try:
        budget = services.budget_for(user)
    except QuotaError as exc:
        return {"error": str(exc), "limits": []}
    for limit in budget["limits"]:
        used, allowed = limit["used"], limit["limit"] or 0
        limit["percent"] = None if used is None or not allowed else min(100 * used // allowed, 999)
        if limit["metric"] == "cost":
            limit["shown"] = {
                k: dollars(limit[k]) if limit[k] is not None else None
                for k in ("used", "limit", "remaining")
            }
    return budget


def _user_chart(hours: list[Any], labels: list[str]) -> Chart:
    unreported = [max(b.tokens - b.tokens_in - b.tokens_out, 0) for b in hours]
    series = [
        Series("prompt", [b.tokens_in for b in hours]),
        Series("completion", [b.tokens_out for b in hours]),
        Series("charged without provider usage", unreported),
    ]
    return stacked_bars("Tokens, last 24 hours", labels, series, every=3)


def _sums(hours: list[Any]) -> dict[str, Any]:
    cost = sum(b.cost for b in hours)
    return {
        "requests": sum(b.requests for b in hours),
        "tokens": sum(b.tokens for b in hours),
        "cost": dollars(cost),
        "refusals": sum(b.refusals for b in hours),
        "since": hours[0].start if hours else timezone.now() - timedelta(days=1),
    }
