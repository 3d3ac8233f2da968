"""Usage rollups: the ledger summed per hour, user, team, plan and model, for dashboards and
users' history (which read these, never the ledger)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

__all__ = ["Dashboard", "UsageRollup"]


class UsageRollup(models.Model):
    """The usage of one hour for one user (none: anonymous clients), team, plan and model.

    Written by the ledger worker in the transaction that creates the ledger rows it sums, so a
    re-delivered batch (rows already written) adds nothing. Kept when ``UsageRecord`` rows are
    pruned (``QUOTAS["LEDGER_RETENTION_DAYS"]``). ``plan`` is the user's plan when the rows
    were written. ``tokens`` is what the quota charged (``actual_tokens``); ``tokens_in`` and
    ``tokens_out`` sum the prompt and completion tokens where the provider reported them (a
    reservation that expired unsettled has neither).

    Refusals (429s) have rows of their own, one per limit that refused (``refused_by``),
    whose ``refusals`` is set from the hour's count in Redis (``quotas.engine.refusals``);
    usage rows have a blank ``refused_by``."""

    bucket_key = models.CharField(
        max_length=64, unique=True, editable=False, help_text="Digest of the bucket's dimensions."
    )
    hour = models.DateTimeField(db_index=True, help_text="Start of the hour (UTC).")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_rollups",
    )
    team = models.ForeignKey(
        "quotas.Team",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_rollups",
    )
    plan = models.ForeignKey(
        "quotas.Plan",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_rollups",
        # A label read when the rows are written (the default plan is remembered for a few
        # seconds): a plan deleted meanwhile must never make the ledger's rows fail.
        db_constraint=False,
    )
    model = models.CharField(max_length=200, blank=True, default="")
    refused_by = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text="The limit that refused, on a row counting refusals (blank: a usage row).",
    )
    requests = models.PositiveBigIntegerField(default=0)
    tokens_in = models.PositiveBigIntegerField(default=0, help_text="Prompt tokens.")
    tokens_out = models.PositiveBigIntegerField(default=0, help_text="Completion tokens.")
    tokens = models.PositiveBigIntegerField(default=0, help_text="Tokens charged (actual).")
    cost = models.PositiveBigIntegerField(default=0, help_text="Cost, in micro-dollars.")
    refusals = models.PositiveBigIntegerField(default=0, help_text="Requests refused (429).")

    class Meta:
        ordering = ["-hour"]
        indexes = [
            models.Index(fields=["user", "hour"]),
            models.Index(fields=["team", "hour"]),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.user_id or 'anonymous'} {self.model}"


class Dashboard(UsageRollup):
    """The admin's usage dashboard (``/admin/quotas/dashboard/``), a view of the rollups:
    a proxy, so the admin lists it in the app index and gives it a permission of its own
    (``quotas.view_dashboard``)."""

    class Meta:
        proxy = True
        verbose_name = "usage dashboard"
        verbose_name_plural = "usage dashboard"
