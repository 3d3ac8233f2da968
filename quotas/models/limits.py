"""Extra limits (a plan's, or global ones over all traffic) and the price table for cost limits.

A limit counts one metric (tokens, requests, or cost in micro-dollars) over one window: a
sliding window of any length in buckets, or a calendar day or month that resets at the
boundary (in ``QUOTAS["TIME_ZONE"]``), optionally only for the models a glob matches.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from quotas.core.globs import glob_error, globs_overlap, specificity
from quotas.core.limits import Limit, Metric, Period, Scope, Window
from quotas.models.plans import MAX_BUDGET, Plan

__all__ = ["ConfigRevision", "GlobalLimit", "LimitFields", "ModelPrice", "PlanLimit"]

MAX_WINDOW_SECONDS = 366 * 86_400


def validate_glob(value: str) -> None:
    """A model glob: ``*`` and ``?`` wildcards only (see ``quotas.core.globs``)."""
    error = glob_error(value)
    if error:
        raise ValidationError(error)


class LimitFields(models.Model):
    """What a limit counts, over which window, for which models, and how much it allows."""

    class Metrics(models.TextChoices):
        TOKENS = Metric.TOKENS.value, "Tokens"
        REQUESTS = Metric.REQUESTS.value, "Requests"
        COST = Metric.COST.value, "Cost (micro-dollars)"

    class Periods(models.TextChoices):
        SLIDING = Period.SLIDING.value, "Sliding window"
        DAY = Period.DAY.value, "Calendar day"
        MONTH = Period.MONTH.value, "Calendar month"

    metric = models.CharField(max_length=8, choices=Metrics.choices, default=Metrics.TOKENS)
    period = models.CharField(max_length=8, choices=Periods.choices, default=Periods.SLIDING)
    window_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_WINDOW_SECONDS)],
        help_text="Sliding windows only: the window's length (60 = a minute, 86400 = a day).",
    )
    bucket_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Sliding windows only: its resolution; blank = a 60th of the window. "
        "Must divide the window.",
    )
    model = models.CharField(
        max_length=200,
        blank=True,
        default="",
        validators=[validate_glob],
        help_text="Only requests for models this glob matches (e.g. gpt-4o*); blank: all.",
    )
    budget = models.PositiveBigIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(MAX_BUDGET)],
        help_text="Units allowed per window: tokens, requests, or micro-dollars (1,000,000 = $1).",
    )

    class Meta:
        abstract = True

    def window(self, time_zone: str = "UTC") -> Window:
        """The window as the engine counts it (``ValueError`` when it is not valid); calendar
        periods in ``time_zone``."""
        if self.period != Period.SLIDING:
            return Window.calendar(Period(self.period), time_zone)
        return Window.sliding(self.window_seconds or 0, self.bucket_seconds or None)

    def as_limit(self, scope: Scope, origin: str, time_zone: str = "UTC") -> Limit:
        """This limit for one scope (``origin`` says where it comes from, for messages)."""
        window = self.window(time_zone)
        return Limit(scope, Metric(self.metric), self.budget, window, self.model, origin)

    def describe(self) -> str:
        """``50000 tokens per 1d`` / ``20000000 cost per month (gpt-4o*)``."""
        window = (
            self.get_period_display().lower()
            if self.period != Period.SLIDING
            else f"{self.window_seconds} s"
        )
        suffix = f" ({self.model})" if self.model else ""
        return f"{self.budget} {self.metric} per {window}{suffix}"

    def clean(self) -> None:
        """Refuse a window the engine cannot count exactly."""
        errors: dict[str, str] = {}
        if self.period == Period.SLIDING:
            if not self.window_seconds:
                errors["window_seconds"] = "A sliding window needs its length in seconds."
            elif self.bucket_seconds and self.window_seconds % self.bucket_seconds:
                errors["bucket_seconds"] = (
                    f"The window ({self.window_seconds} s) must be a multiple of its bucket "
                    f"({self.bucket_seconds} s)."
                )
            elif self.bucket_seconds and self.window_seconds // self.bucket_seconds > 1000:
                errors["bucket_seconds"] = "A window may have at most 1000 buckets."
        elif self.window_seconds or self.bucket_seconds:
            errors["window_seconds"] = "A calendar day or month has no window length to give."
        if errors:
            raise ValidationError(errors)


class PlanLimit(LimitFields):
    """An extra limit of a plan: it applies to each user on the plan (and, for a team's plan,
    to the team as a whole), on top of the plan's hourly budget."""

    plan = models.ForeignKey(Plan, on_delete=models.CASCADE, related_name="limits")

    class Meta:
        ordering = ["plan", "metric", "period", "window_seconds"]
        verbose_name = "plan limit"

    def __str__(self) -> str:
        return f"{self.plan}: {self.describe()}"

    def clean(self) -> None:
        """Also refuse a token budget below the plan's per-request cap: a request the cap
        allows could never fit this window."""
        super().clean()
        plan = self.plan if self.plan_id else None
        cap = plan.max_tokens_per_request if plan else None
        if self.metric == Metric.TOKENS and cap and self.budget and self.budget < cap:
            raise ValidationError(
                {
                    "budget": f"This budget ({self.budget}) is below the plan's per-request "
                    f"cap ({cap}): lower the cap or raise the budget."
                }
            )


class GlobalLimit(LimitFields):
    """A limit over all traffic together (optionally per model): the provider key's TPM and
    RPM, or a bill you never want to exceed."""

    name = models.CharField(max_length=100, help_text="What it protects, e.g. 'OpenAI TPM'.")
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "global limit"

    def __str__(self) -> str:
        return f"{self.name}: {self.describe()}"


class ModelPrice(models.Model):
    """Input and output prices of the models a glob matches, in US dollars per million tokens.
    The most specific glob wins (an exact name, then the glob with the most literal
    characters); two globs that are equally specific and can match the same model are
    refused, as the price would be ambiguous."""

    model = models.CharField(max_length=200, unique=True, validators=[validate_glob])
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )

    class Meta:
        ordering = ["model"]
        verbose_name = "model price"
        constraints = [
            models.CheckConstraint(
                condition=Q(input_per_million__gte=0, output_per_million__gte=0),
                name="quotas_modelprice_not_negative",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model}: ${self.input_per_million} / ${self.output_per_million} per 1M"

    def clean(self) -> None:
        if not self.model:
            raise ValidationError({"model": "Name a model or a glob (e.g. gpt-4o*)."})
        others = ModelPrice.objects.exclude(pk=self.pk).values_list("model", flat=True)
        for other in others:
            if specificity(other) == specificity(self.model) and globs_overlap(other, self.model):
                raise ValidationError(
                    {
                        "model": f"'{self.model}' and '{other}' are equally specific and can "
                        "match the same model: the price would be ambiguous. Make one of "
                        "them more specific."
                    }
                )


class ConfigRevision(models.Model):
    """How many times the limits changed: one row, counted up by ``config_changed`` before it
    bumps the config version in Redis. Redis keeps the revision its version was last bumped
    for, and the ledger sweep (``flush_ledger``) compares the two: a change Redis could not
    take when it was saved is published by the next sweep once Redis answers, even if the
    process that saved it is gone (see ``quotas.engine.config.publish_config_changes``)."""

    revision = models.PositiveBigIntegerField(default=0)
    changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "config revision"

    def __str__(self) -> str:
        return f"limits revision {self.revision}"
