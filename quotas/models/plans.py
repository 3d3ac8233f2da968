"""Plans, teams and per-user quotas: who gets which budget."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

__all__ = ["MAX_BUDGET", "MODEL_NAME_MAX", "Plan", "PlanQuerySet", "Team", "UserQuota"]

# The largest budget a limit may have: Redis counts in Lua numbers, exact to 2^53; this
# leaves room for many windows' worth of usage above any budget.
MAX_BUDGET = 10**12
# The longest model name the ledger stores (UsageRecord.model).
MODEL_NAME_MAX = 200


class PlanQuerySet(models.QuerySet["Plan"]):
    def active(self) -> PlanQuerySet:
        return self.filter(is_active=True)


class Plan(models.Model):
    """A tier of hourly token budgets and request limits. Empty limits mean "no such limit"."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    tier = models.PositiveSmallIntegerField(
        default=0, help_text="Ordering of plans, cheapest first."
    )
    tokens_per_hour = models.PositiveBigIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(MAX_BUDGET)],
        help_text="The plan's primary budget: tokens per window (WINDOW_SECONDS, an hour).",
    )
    max_tokens_per_request = models.PositiveBigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(MAX_BUDGET)]
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    max_concurrent_requests = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    default_output_tokens = models.PositiveIntegerField(
        default=256,
        validators=[MinValueValidator(1)],
        help_text="Output allowance reserved when a request names no max_tokens.",
    )
    is_default = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    # The degradation ladder (quotas.llm, calls made with degrade=True): each rung is tried
    # only when the one above refuses.
    fallback_models = models.JSONField(
        default=list,
        blank=True,
        help_text="Cheaper models tried in this order when the requested model refuses, "
        'e.g. ["gpt-4o-mini"].',
    )
    serve_from_cache = models.BooleanField(
        default=False,
        help_text="Then answer from the exact-match response cache when it holds the request.",
    )
    cache_hit_cost = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("1"))],
        help_text="Share of the cached answer's tokens a cache hit costs (0: free, 1: full).",
    )
    defer_when_refused = models.BooleanField(
        default=False,
        help_text="Then queue the request as a job run when the budget or the provider frees.",
    )

    objects = PlanQuerySet.as_manager()

    class Meta:
        ordering = ["tier", "tokens_per_hour", "slug"]
        constraints = [
            models.CheckConstraint(
                condition=Q(tokens_per_hour__gte=1), name="quotas_plan_tokens_positive"
            ),
            models.CheckConstraint(
                condition=Q(max_tokens_per_request__isnull=True)
                | Q(
                    max_tokens_per_request__gte=1,
                    max_tokens_per_request__lte=F("tokens_per_hour"),
                ),
                name="quotas_plan_request_cap_within_budget",
            ),
            models.CheckConstraint(
                condition=Q(requests_per_minute__isnull=True) | Q(requests_per_minute__gte=1),
                name="quotas_plan_rpm_positive",
            ),
            models.CheckConstraint(
                condition=Q(max_concurrent_requests__isnull=True)
                | Q(max_concurrent_requests__gte=1),
                name="quotas_plan_concurrency_positive",
            ),
            models.UniqueConstraint(
                fields=["is_default"],
                condition=Q(is_default=True),
                name="quotas_plan_single_default",
                violation_error_message="Only one plan can be the default plan.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Refuse a cap above the hourly budget and an inactive default plan.

        Errors are keyed to the field at fault; a form that does not show that field (the
        admin's list view) shows them as errors of the whole form (``quotas.admin``)."""
        errors = {}
        cap, budget = self.max_tokens_per_request, self.tokens_per_hour
        if cap is not None and budget is not None and cap > budget:
            errors["max_tokens_per_request"] = (
                f"The per-request cap ({cap}) cannot exceed tokens_per_hour ({budget})."
            )
        if self.is_default and not self.is_active:
            errors["is_default"] = "The default plan must be active."
        below = self._token_budgets_below(cap)
        if below and "max_tokens_per_request" not in errors:
            errors["max_tokens_per_request"] = (
                f"The per-request cap ({cap}) is above this plan's token limit of {below}: "
                "a request the cap allows could never fit it."
            )
        problem = fallback_models_problem(self.fallback_models)
        if problem:
            errors["fallback_models"] = problem
        if errors:
            raise ValidationError(errors)

    def _token_budgets_below(self, cap: int | None) -> int | None:
        """The smallest budget of this plan's extra token limits below ``cap``, if any."""
        if not cap or self.pk is None:
            return None
        budgets = self.limits.filter(metric="tokens", budget__lt=cap).values_list(
            "budget", flat=True
        )
        return min(budgets, default=None)


def fallback_models_problem(value: Any) -> str | None:
    """What is wrong with a ladder of fallback models, or ``None``: it must be a list of
    distinct model names (1 to 200 characters, no control characters)."""
    if not isinstance(value, list):
        return 'Fallback models must be a JSON list of model names, e.g. ["gpt-4o-mini"].'
    for name in value:
        if not isinstance(name, str) or not name.strip():
            return f"Fallback models must be non-empty strings, not {name!r}."
        if len(name) > MODEL_NAME_MAX or any(ord(c) < 32 or ord(c) == 127 for c in name):
            return f"{name[:40]!r} is not a model name (at most 200 printable characters)."
    if len(set(value)) != len(value):
        return "Fallback models must not repeat a model."
    return None


class UserQuota(models.Model):
    """A user's plan assignment. No plan means the default plan; an override replaces the
    plan's hourly budget for this user only."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="token_quota"
    )
    plan = models.ForeignKey(
        Plan, null=True, blank=True, on_delete=models.SET_NULL, related_name="user_quotas"
    )
    tokens_per_hour_override = models.PositiveBigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(MAX_BUDGET)]
    )
    team = models.ForeignKey(
        "quotas.Team",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="members",
        help_text="The team whose pooled budget this user's requests also count against.",
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(tokens_per_hour_override__isnull=True)
                | Q(tokens_per_hour_override__gte=1),
                name="quotas_userquota_override_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} on {self.plan or 'the default plan'}"


class Team(models.Model):
    """A pooled budget its members share: its plan's limits count the whole team's usage
    (tokens per hour, requests per minute, the plan's extra limits) on top of each member's
    own. A user belongs to at most one team (``UserQuota.team``). No plan: no pooled limit."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    plan = models.ForeignKey(
        Plan,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="teams",
        help_text="Limits of the team as a whole (its members' usage added up).",
    )
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
