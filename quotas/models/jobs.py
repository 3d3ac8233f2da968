"""Deferred jobs: requests the last rung of a degradation ladder queued for later."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from quotas.models.plans import MODEL_NAME_MAX

__all__ = ["DeferredJob"]


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
