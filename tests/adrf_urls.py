"""Async DRF (``adrf``) views used only by the tests: the token quota's throttle, in its sync
and its coroutine form, on ``async def`` handlers (one streaming over an async generator)."""

from __future__ import annotations

from adrf.views import APIView
from django.http import StreamingHttpResponse
from django.urls import path
from rest_framework.response import Response

from quotas.throttling import AsyncTokenQuotaThrottle, TokenQuotaThrottle
from tests.async_urls import USAGE, events_with_usage


class Completion(APIView):
    throttle_classes = [TokenQuotaThrottle]

    async def post(self, request):
        return Response({"id": "x", "usage": USAGE})


class AsyncThrottleCompletion(Completion):
    throttle_classes = [AsyncTokenQuotaThrottle]


class Stream(APIView):
    throttle_classes = [AsyncTokenQuotaThrottle]

    async def post(self, request):
        return StreamingHttpResponse(events_with_usage(), content_type="text/event-stream")


urlpatterns = [
    path("adrf/completion/", Completion.as_view()),
    path("adrf/async-throttle/", AsyncThrottleCompletion.as_view()),
    path("adrf/stream/", Stream.as_view()),
]
