"""``GET me/usage/``: the caller's own usage history, from the hourly rollups."""

from __future__ import annotations

from rest_framework import permissions, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import services
from quotas.api.schema import AUTH_ERRORS, documented

__all__ = ["MyUsageView", "UsageBucketSerializer", "UsagePagination"]


class UsageBucketSerializer(serializers.Serializer):
    """One hour or day of usage, ``[start, end)``; ``cost`` in micro-dollars."""

    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    requests = serializers.IntegerField()
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    tokens = serializers.IntegerField()
    cost = serializers.IntegerField()
    refusals = serializers.IntegerField()


class UsagePageSerializer(serializers.Serializer):
    """A page of buckets: the period, the bucket's unit and DRF's page fields."""

    period = serializers.ChoiceField(choices=["day", "month"])
    bucket = serializers.ChoiceField(choices=["hour", "day"])
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = UsageBucketSerializer(many=True)


class PeriodErrorSerializer(serializers.Serializer):
    """The 400 of an unknown ``period`` (DRF's validation error body)."""

    period = serializers.ListField(child=serializers.CharField())


class UsagePagination(PageNumberPagination):
    """Pages of at most 31 buckets by default (a whole period); ``?page_size=`` up to 100."""

    page_size = 31
    page_size_query_param = "page_size"
    max_page_size = 100


class MyUsageView(APIView):
    """``GET me/usage/?period=day|month``: the caller's usage in hourly buckets over the last
    24 hours (``day``, the default) or daily buckets over the last 30 days (``month``), newest
    first, empty buckets included, paginated. Only ever the caller's own usage."""

    permission_classes = [permissions.IsAuthenticated]
    pagination_class = UsagePagination

    @documented(
        responses={
            200: UsagePageSerializer,
            400: (PeriodErrorSerializer, "An unknown ``period``."),
            **AUTH_ERRORS,
        },
        query={
            "period": (
                "Hourly buckets of the last day, or daily ones of 30 days.",
                ["day", "month"],
            ),
            "page": ("A page number (DRF pagination).", None),
            "page_size": ("Buckets per page, at most 100 (default 31).", None),
        },
    )
    def get(self, request: Request) -> Response:
        period = request.query_params.get("period", "day")
        if period not in services.PERIODS:
            choices = " or ".join(repr(p) for p in services.PERIODS)
            raise ValidationError({"period": [f"Must be {choices}, not {period[:50]!r}."]})
        buckets = services.usage_history(request.user.pk, period)[::-1]
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(buckets, request, view=self)  # type: ignore[arg-type]
        response = paginator.get_paginated_response(UsageBucketSerializer(page, many=True).data)
        unit, _ = services.PERIODS[period]
        response.data = {"period": period, "bucket": unit, **response.data}
        return response
