"""Serializers of the budget endpoints."""

from __future__ import annotations

from rest_framework import serializers

from quotas.models import Plan

__all__ = ["BudgetSerializer", "PlanSerializer"]


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
