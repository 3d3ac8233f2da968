"""The ledger's change list: sums of what the current filter shows, and a CSV export of the
filtered rows, streamed (memory stays flat whatever the ledger's size)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from quotas.dashboard.figures import dollars
from quotas.models import UsageRecord

__all__ = ["CSV_COLUMNS", "LedgerSumsAndExport", "csv_safe"]

CSV_COLUMNS = (
    "request_id",
    "scope",
    "user_id",
    "team_id",
    "model",
    "status",
    "estimated_tokens",
    "prompt_tokens",
    "completion_tokens",
    "actual_tokens",
    "estimated_cost",
    "cost",
    "created_at",
    "settled_at",
)
# A cell a spreadsheet would run as a formula (model names and ids come from clients).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """``value``, with text a spreadsheet would read as a formula quoted by a leading ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


class _Echo:
    def write(self, value: str) -> str:
        return value


class LedgerSumsAndExport:
    """Mixed into the ledger's ``ModelAdmin``: ``ledger_sums`` in the change list's context,
    and ``export/`` (the same filters, search and date drill-down) as a CSV download."""

    change_list_template = "admin/quotas/usagerecord/change_list.html"
    # Narrow columns, so the list fits a 1280 px screen beside the admin's navigation.
    ledger_columns = ["request", "user", "model", "status", "tokens", "cost_shown", "reserved"]

    @admin.display(description="request", ordering="request_id")
    def request(self, obj: UsageRecord) -> str:
        """The request id, cut to 14 characters (the whole id in its tooltip)."""
        rid = obj.request_id
        return format_html('<span title="{}">{}</span>', rid, Truncator(rid).chars(14))

    @admin.display(description="reserved at", ordering="created_at")
    def reserved(self, obj: UsageRecord) -> str:
        moment = timezone.localtime(obj.created_at)
        return format_html(
            '<span title="{}">{}</span>', moment.isoformat(), f"{moment:%m-%d %H:%M}"
        )

    @admin.display(description="est. → actual", ordering="actual_tokens")
    def tokens(self, obj: UsageRecord) -> str:
        return f"{obj.estimated_tokens:,} → {obj.actual_tokens:,}"

    @admin.display(description="cost", ordering="cost")
    def cost_shown(self, obj: UsageRecord) -> str:
        return dollars(obj.cost)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view  # type: ignore[attr-defined]
        export = path("export/", wrap(self.export_view), name="quotas_usagerecord_export")
        return [export, *super().get_urls()]  # type: ignore[misc]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)  # type: ignore[misc]
        context = getattr(response, "context_data", None)
        if context and context.get("cl") is not None:
            context["ledger_sums"] = _sums(context["cl"].queryset)
        return response  # type: ignore[no-any-return]

    def export_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):  # type: ignore[attr-defined]
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)  # type: ignore[attr-defined]
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("These filters are not valid.")
        rows = changelist.queryset.order_by("-created_at", "-pk").values_list(*CSV_COLUMNS)
        response = StreamingHttpResponse(_lines(rows), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="usage-records.csv"'
        return response


def _lines(rows: Any) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for row in rows.iterator(chunk_size=2000):
        yield writer.writerow([csv_safe(value) for value in row])


def _sums(queryset: Any) -> dict[str, Any]:
    sums = queryset.order_by().aggregate(
        records=Count("pk"),
        estimated=Sum("estimated_tokens"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        actual=Sum("actual_tokens"),
        cost=Sum("cost"),
    )
    sums = {key: value or 0 for key, value in sums.items()}
    sums["cost_shown"] = dollars(sums["cost"])
    return sums
