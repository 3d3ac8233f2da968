"""Admin: plans are editable, user quotas show live usage, the usage ledger is read-only.

Actions delegate to ``quotas.services``; every edit takes effect on the user's next request.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.core.exceptions import NON_FIELD_ERRORS, FieldDoesNotExist, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.text import capfirst

from quotas import services
from quotas.dashboard.ledger import LedgerSumsAndExport
from quotas.dashboard.views import DashboardAdmin
from quotas.exceptions import QuotaError
from quotas.models import (
    Dashboard,
    DeferredJob,
    GlobalLimit,
    ModelPrice,
    Plan,
    PlanLimit,
    Team,
    UsageRecord,
    UserQuota,
)

__all__ = [
    "DashboardAdmin",
    "DeferredJobAdmin",
    "GlobalLimitAdmin",
    "ModelErrorsForm",
    "ModelPriceAdmin",
    "PlanAdmin",
    "TeamAdmin",
    "UsageRecordAdmin",
    "UserQuotaAdmin",
]


class ModelErrorsForm(forms.ModelForm):
    """A model form that shows every error of the model's validation, including errors about
    fields it does not show (a changelist's ``list_editable`` form shows a few): those become
    errors of the whole form, named after their field. Django raises ``ValueError`` (a 500)
    for them instead."""

    def add_error(self, field: str | None, error: Any) -> None:
        if field is None and isinstance(error, ValidationError) and hasattr(error, "error_dict"):
            error = ValidationError(self._shown(error.error_dict))
        super().add_error(field, error)

    def _shown(self, errors: dict[str, list[ValidationError]]) -> dict[str, list[Any]]:
        shown: dict[str, list[Any]] = {}
        for name, errors_of_name in errors.items():
            if name == NON_FIELD_ERRORS or name in self.fields:
                shown.setdefault(name, []).extend(errors_of_name)
                continue
            label = self._label(name)
            texts = ValidationError(errors_of_name).messages
            shown.setdefault(NON_FIELD_ERRORS, []).extend(
                ValidationError(f"{label}: {text}") for text in texts
            )
        return shown

    def _label(self, name: str) -> str:
        try:
            return str(capfirst(self._meta.model._meta.get_field(name).verbose_name))
        except FieldDoesNotExist:
            return name


class PlanAdminForm(ModelErrorsForm):
    class Meta:
        model = Plan
        fields = [
            "name",
            "slug",
            "tier",
            "tokens_per_hour",
            "max_tokens_per_request",
            "requests_per_minute",
            "max_concurrent_requests",
            "default_output_tokens",
            "is_default",
            "is_active",
            "fallback_models",
            "serve_from_cache",
            "cache_hit_cost",
            "defer_when_refused",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Left empty (or not sent by an older form): no ladder, free cache hits.
        if "cache_hit_cost" in self.fields:
            self.fields["cache_hit_cost"].required = False

    def clean_fallback_models(self) -> Any:
        value = self.cleaned_data.get("fallback_models")
        return [] if value in (None, "") else value

    def clean_cache_hit_cost(self) -> Any:
        value = self.cleaned_data.get("cache_hit_cost")
        return Decimal("0") if value is None else value


LIMIT_FIELDS = ["metric", "period", "window_seconds", "bucket_seconds", "model", "budget"]


# Sized so a plan's inline of limits fits the admin's content column at 1280 px.
LIMIT_WIDGETS = {
    "window_seconds": forms.NumberInput(attrs={"style": "width: 6.5em"}),
    "bucket_seconds": forms.NumberInput(attrs={"style": "width: 5em"}),
    "model": forms.TextInput(attrs={"size": 12}),
    "budget": forms.NumberInput(attrs={"style": "width: 8.5em"}),
}


class PlanLimitForm(ModelErrorsForm):
    class Meta:
        model = PlanLimit
        fields = LIMIT_FIELDS
        widgets = LIMIT_WIDGETS


class PlanLimitInline(admin.TabularInline):
    """A plan's extra limits: a day's tokens, a month's cost, a model's tokens per minute."""

    model = PlanLimit
    form = PlanLimitForm
    extra = 0
    fields = LIMIT_FIELDS


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "tier",
        "tokens_per_hour",
        "max_tokens_per_request",
        "requests_per_minute",
        "max_concurrent_requests",
        "default_output_tokens",
        "is_default",
        "is_active",
    ]
    list_editable = ["tokens_per_hour", "requests_per_minute", "is_active"]
    list_filter = ["is_active", "is_default"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name", "slug"]
    form = PlanAdminForm
    inlines = [PlanLimitInline]

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        # Django builds the list view's forms on a plain ModelForm, not on ``form``.
        return super().get_changelist_form(request, **{"form": PlanAdminForm, **kwargs})


class MoveToPlanForm(ActionForm):
    plan = forms.ModelChoiceField(
        Plan.objects.active(), required=False, help_text="Target plan for “Move to plan”."
    )


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "plan", "team", "tokens_per_hour_override", "live_usage", "usage_page"]
    list_filter = ["plan", "team"]
    list_select_related = ["user", "plan", "team"]
    search_fields = ["user__username", "user__email"]
    autocomplete_fields = ["user"]
    action_form = MoveToPlanForm
    actions = ["reset_window", "move_to_plan"]

    @admin.display(description="Used / limit (live)")
    def live_usage(self, obj: UserQuota) -> str:
        try:
            budget = services.budget_for(obj.user)
        except QuotaError as exc:
            return f"unavailable: {exc}"
        if budget["used"] is None:
            return f"? / {budget['limit']} (Redis unavailable)"
        reset = int(budget["reset_seconds"] or 0)
        return (
            f"{budget['used']} / {budget['limit']} ({budget['reserved']} reserved); "
            f"{budget['remaining']} left, full in {reset // 60}m{reset % 60:02d}s"
        )

    @admin.display(description="Usage")
    def usage_page(self, obj: UserQuota) -> str:
        url = reverse("admin:quotas_dashboard_user", args=[obj.user_id])
        return format_html('<a href="{}">usage page</a>', url)

    @admin.action(description="Reset the selected users' windows (full budget now)")
    def reset_window(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        for quota in queryset.select_related("user"):
            services.reset_window(quota.user)
        self.message_user(request, f"Reset {queryset.count()} window(s).")

    @admin.action(description="Move the selected users to the chosen plan")
    def move_to_plan(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        plan = request.POST.get("plan")
        target = Plan.objects.filter(pk=plan).first() if plan else None
        if target is None:
            self.message_user(request, "Choose a plan first.", level=messages.ERROR)
            return
        moved = services.move_to_plan(list(queryset.values_list("user_id", flat=True)), target)
        self.message_user(request, f"Moved {moved} user(s) to {target}.")


class TeamMemberInline(admin.TabularInline):
    """The team's members: each user's quota row (a user belongs to at most one team)."""

    model = UserQuota
    fk_name = "team"
    fields = ["user", "plan", "tokens_per_hour_override"]
    autocomplete_fields = ["user"]
    extra = 0
    verbose_name = "member"
    verbose_name_plural = "members"


class TeamAdminForm(ModelErrorsForm):
    class Meta:
        model = Team
        fields = ["name", "slug", "plan", "is_active"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    """Teams: a pooled budget (the team's plan) its members share."""

    list_display = ["name", "slug", "plan", "member_count", "is_active"]
    list_filter = ["is_active", "plan"]
    list_select_related = ["plan"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name", "slug"]
    form = TeamAdminForm
    inlines = [TeamMemberInline]

    @admin.display(description="Members")
    def member_count(self, obj: Team) -> int:
        return obj.members.count()


class GlobalLimitForm(ModelErrorsForm):
    class Meta:
        model = GlobalLimit
        fields = ["name", *LIMIT_FIELDS, "is_active"]
        widgets = LIMIT_WIDGETS


@admin.register(GlobalLimit)
class GlobalLimitAdmin(admin.ModelAdmin):
    """Limits over all traffic together: the provider key's TPM and RPM, a monthly bill."""

    list_display = ["name", "metric", "window", "model", "budget", "is_active"]
    list_editable = ["budget", "is_active"]
    list_filter = ["metric", "period", "is_active"]
    search_fields = ["name", "model"]
    form = GlobalLimitForm

    @admin.display(description="window", ordering="window_seconds")
    def window(self, obj: GlobalLimit) -> str:
        if obj.period == GlobalLimit.Periods.SLIDING:
            return f"{obj.window_seconds} s sliding"
        return obj.get_period_display()

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        return super().get_changelist_form(request, **{"form": GlobalLimitForm, **kwargs})


class ModelPriceForm(ModelErrorsForm):
    class Meta:
        model = ModelPrice
        fields = ["model", "input_per_million", "output_per_million"]


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Prices in US dollars per million tokens, for cost limits and the ledger's cost."""

    list_display = ["model", "input_per_million", "output_per_million"]
    list_editable = ["input_per_million", "output_per_million"]
    search_fields = ["model"]
    form = ModelPriceForm

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        return super().get_changelist_form(request, **{"form": ModelPriceForm, **kwargs})


@admin.register(UsageRecord)
class UsageRecordAdmin(LedgerSumsAndExport, admin.ModelAdmin):
    """The ledger is evidence: it can be read and filtered, never edited; the change list
    shows the sums of the current filter and exports it as CSV."""

    list_display = LedgerSumsAndExport.ledger_columns
    list_filter = ["status", "model", "created_at", ("user", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["request_id", "user__username", "model", "scope"]
    date_hierarchy = "created_at"
    list_select_related = ["user"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(DeferredJob)
class DeferredJobAdmin(admin.ModelAdmin):
    """Deferred LLM jobs (the last rung of a degradation ladder): read-only, like the ledger;
    the worker and the sweep move them along."""

    list_display = ["id", "user", "status", "model", "attempts", "created_at", "finished_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "user__username", "model"]
    date_hierarchy = "created_at"
    list_select_related = ["user"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


admin.site.register(Dashboard, DashboardAdmin)
