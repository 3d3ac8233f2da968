"""Plans, per-user quotas and the usage ledger.

The ledger (``UsageRecord``) is the source of truth: Redis windows can be rebuilt from it.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

__all__ = ["DeferredJob", "Plan", "UsageRecord", "UserQuota"]

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
    tokens_per_hour = models.PositiveBigIntegerField(validators=[MinValueValidator(1)])
    max_tokens_per_request = models.PositiveBigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
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
        problem = fallback_models_problem(self.fallback_models)
        if problem:
            errors["fallback_models"] = problem
        if errors:
            raise ValidationError(errors)


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
        null=True, blank=True, validators=[MinValueValidator(1)]
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


class UsageRecord(models.Model):
    """One durable row per reservation: what was estimated and what was really used."""

    class Status(models.TextChoices):
        SETTLED = "settled", "Settled"
        EXPIRED = "expired", "Expired (charged at estimate)"
        REFUNDED = "refunded", "Refunded (request failed)"
        DEGRADED = "degraded", "Recorded while Redis was unavailable"

    request_id = models.CharField(max_length=200, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="token_usage",
    )
    scope = models.CharField(
        max_length=200, db_index=True, help_text="The quota key: a user id or an anonymous key."
    )
    model = models.CharField(max_length=200, blank=True, default="")
    estimated_tokens = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    actual_tokens = models.PositiveBigIntegerField(default=0)
    difference = models.GeneratedField(
        expression=F("actual_tokens") - F("estimated_tokens"),
        output_field=models.BigIntegerField(),
        db_persist=True,
    )
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    created_at = models.DateTimeField(db_index=True, help_text="When the tokens were reserved.")
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["scope", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.actual_tokens} tokens ({self.status})"


class DeferredJob(models.Model):
    """A request queued by the last rung of a degradation ladder: run by a Celery worker when
    the user's budget and the provider allow, exactly once; only its owner may read it."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        EXPIRED = "expired", "Expired (never ran in time)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="deferred_llm_jobs"
    )
    provider = models.CharField(max_length=200)
    request = models.JSONField(help_text="The chat completion request, as the caller made it.")
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    model = models.CharField(max_length=MODEL_NAME_MAX, blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    usage = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    run_after = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.id} ({self.status})"
