"""Serializers of the budget endpoints."""

from __future__ import annotations

from rest_framework import serializers

from quotas.models import Plan

__all__ = [
    "BudgetSerializer",
    "DeferredJobSerializer",
    "HealthSerializer",
    "PlanSerializer",
    "ProviderLimitsSerializer",
]


class PlanSerializer(serializers.ModelSerializer):
    """The public fields of an active plan."""

    class Meta:
        model = Plan
        fields = [
            "slug",
            "name",
            "tier",
            "tokens_per_hour",
            "max_tokens_per_request",
            "requests_per_minute",
            "max_concurrent_requests",
            "default_output_tokens",
            "is_default",
        ]
        read_only_fields = fields


class PlanRefSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()


class TeamRefSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()


class LimitSerializer(serializers.Serializer):
    """One limit that applies to the user: whose (``scope``: user, team, global), what it
    counts (``metric``: tokens, requests, cost in micro-dollars), for which models (a glob;
    blank: all), over which window, and its live figures (``null`` while Redis is
    unavailable)."""

    name = serializers.CharField()
    scope = serializers.CharField()
    metric = serializers.CharField()
    unit = serializers.CharField()
    model = serializers.CharField(allow_blank=True)
    window = serializers.CharField()
    window_seconds = serializers.FloatField(allow_null=True)
    limit = serializers.IntegerField()
    used = serializers.IntegerField(allow_null=True)
    remaining = serializers.IntegerField(allow_null=True)
    reset_seconds = serializers.FloatField(allow_null=True)


class BudgetSerializer(serializers.Serializer):
    """A budget snapshot (``services.budget_for``); ``used`` includes ``reserved``;
    ``remaining`` is never negative and ``debt`` is the usage beyond the limit.

    Live figures are ``null`` (and ``degraded`` true) while Redis is unavailable.
    """

    plan = PlanRefSerializer()
    window_seconds = serializers.FloatField()
    limit = serializers.IntegerField()
    used = serializers.IntegerField(allow_null=True)
    reserved = serializers.IntegerField(allow_null=True)
    remaining = serializers.IntegerField(allow_null=True)
    debt = serializers.IntegerField(allow_null=True)
    reset_seconds = serializers.FloatField(allow_null=True)
    max_tokens_per_request = serializers.IntegerField(allow_null=True)
    requests_per_minute = serializers.IntegerField(allow_null=True)
    requests_used = serializers.IntegerField(allow_null=True)
    max_concurrent_requests = serializers.IntegerField(allow_null=True)
    in_flight = serializers.IntegerField(allow_null=True)
    degraded = serializers.BooleanField()
    team = TeamRefSerializer(allow_null=True)
    limits = LimitSerializer(many=True)


class LedgerHealthSerializer(serializers.Serializer):
    outboxes_waiting = serializers.IntegerField(allow_null=True)
    oldest_record_seconds = serializers.FloatField(allow_null=True)
    warn_after_seconds = serializers.FloatField()


class HealthSerializer(serializers.Serializer):
    """``GET health/``: ``status`` ``ok`` (200) or ``degraded`` (503)."""

    status = serializers.ChoiceField(choices=["ok", "degraded"])
    redis = serializers.ChoiceField(choices=["ok", "unavailable"])
    broker = serializers.ChoiceField(choices=["ok", "unavailable", "unknown"])
    ledger = LedgerHealthSerializer()


class DeferredJobSerializer(serializers.Serializer):
    """``GET jobs/<id>/``: a deferred job; ``result`` is the chat completion once it ran."""

    id = serializers.UUIDField()
    object = serializers.ChoiceField(choices=["quota.deferred_job"])
    status = serializers.ChoiceField(
        choices=["queued", "running", "succeeded", "failed", "expired"]
    )
    model = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    attempts = serializers.IntegerField(min_value=0)
    result = serializers.JSONField(help_text="The chat completion (null until it ran).")
    error = serializers.CharField(allow_null=True)
    retry_after_seconds = serializers.IntegerField(required=False, min_value=1)


class ProviderLimitsSerializer(serializers.Serializer):
    """``GET limits/``: each provider key and model's learned state (``null`` and a
    ``detail`` with 503 while Redis is unavailable)."""

    providers = serializers.ListField(child=serializers.DictField(), allow_null=True)
    detail = serializers.CharField(required=False)
