"""The usage ledger: one durable row per reservation, the source of truth that Redis windows
are rebuilt from."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F

__all__ = ["UsageRecord"]


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
    team = models.ForeignKey(
        "quotas.Team",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_records",
        help_text="The team the request counted against, if any.",
    )
    estimated_tokens = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    actual_tokens = models.PositiveBigIntegerField(default=0)
    difference = models.GeneratedField(
        expression=F("actual_tokens") - F("estimated_tokens"),
        output_field=models.BigIntegerField(),
        db_persist=True,
    )
    estimated_cost = models.PositiveBigIntegerField(
        default=0, help_text="Estimated cost, in micro-dollars (0: no price applies)."
    )
    cost = models.PositiveBigIntegerField(
        default=0, help_text="Cost of the actual usage, in micro-dollars."
    )
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    created_at = models.DateTimeField(db_index=True, help_text="When the tokens were reserved.")
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["scope", "created_at"]),
            models.Index(fields=["team", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.actual_tokens} tokens ({self.status})"
