"""``GET me/usage/``: the caller's own usage history, from the hourly rollups."""

from __future__ import annotations

from rest_framework import permissions, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import services

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
