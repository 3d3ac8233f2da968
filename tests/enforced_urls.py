"""Views used only by the tests: a DRF view with the throttle, a plain Django view with the
decorator, a streaming view, and views that fail or settle explicitly."""

from __future__ import annotations

import json

from django.contrib import admin
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import services
from quotas.decorators import enforce_quota
from quotas.throttling import TokenQuotaThrottle

USAGE = {"prompt_tokens": 11, "completion_tokens": 29, "total_tokens": 40}


class Completion(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        return Response({"id": "x", "usage": USAGE})


class OpenCompletion(Completion):
    permission_classes = [AllowAny]


class NoUsage(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        return Response({"ok": True})


class Failing(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        return Response({"detail": "upstream failed"}, status=502)


class Rejecting(APIView):
    """Refuses the request after the throttle reserved it (a 4xx of the view's own)."""

    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        return Response({"detail": "model not found"}, status=404)


class ExplicitSettle(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        services.settle(request.quota_reservation, total_tokens=7)
        return Response({"usage": {"prompt_tokens": 500, "completion_tokens": 500}})


class OwnEstimate(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def get_token_estimate(self, request):
        return 123

    def post(self, request):
        return Response({"ok": True})


class Streaming(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        with_usage = request.data.get("stream_usage", False)

        def events():
            for word in ["hello", " world", " again"]:
                chunk = {"choices": [{"delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if with_usage:
                yield f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingHttpResponse(events(), content_type="text/event-stream")


# Events a metered stream must survive: not JSON, JSON that is not an event, fields of the
# wrong type, usage figures that cannot be true, an event split across two chunks, "data:"
# without a space, comments and other fields. The only text is "hello world".
MALFORMED_EVENTS = [
    b"data: not json\n\n",
    b"data: [1, 2]\n\n",
    b'data: {"choices": "oops"}\n\n',
    b'data: {"choices": [1, {"delta": "text"}, {"delta": {"content": 5}}, {"delta": null}]}\n\n',
    b'data: {"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": "9", '
    b'"total_tokens": true}}\n\n',
    b'data: {"choices": [{"delta": {"content": "hel',
    b'lo"}}]}\n\n',
    b'data:{"choices": [{"delta": {"content": " world"}}]}\n\n',
    b": a comment\n",
    b"event: ping\n",
    b"data: \n\n",
    b"data: [DONE]\n\n",
]


class MalformedStream(APIView):
    throttle_classes = [TokenQuotaThrottle]

    def post(self, request):
        return StreamingHttpResponse(iter(MALFORMED_EVENTS), content_type="text/event-stream")


class ExplicitSettleStream(Streaming):
    def post(self, request):
        services.settle(request.quota_reservation, total_tokens=7)
        return super().post(request)


@enforce_quota
def plain_view(request):
    return JsonResponse({"usage": USAGE})


@enforce_quota(estimate=lambda request: 50)
def plain_fixed(request):
    return HttpResponse("ok")


@enforce_quota(estimate=lambda request: 400)
def plain_heavy(request):
    return HttpResponse("ok")


@enforce_quota
def plain_rejecting(request):
    return JsonResponse({"detail": "unknown model"}, status=422)


urlpatterns = [
    path("completion/", Completion.as_view()),
    path("open/", OpenCompletion.as_view()),
    path("no-usage/", NoUsage.as_view()),
    path("failing/", Failing.as_view()),
    path("rejecting/", Rejecting.as_view()),
    path("explicit/", ExplicitSettle.as_view()),
    path("own-estimate/", OwnEstimate.as_view()),
    path("stream/", Streaming.as_view()),
    path("explicit-stream/", ExplicitSettleStream.as_view()),
    path("malformed-stream/", MalformedStream.as_view()),
    path("plain/", plain_view),
    path("plain-fixed/", plain_fixed),
    path("plain-heavy/", plain_heavy),
    path("plain-rejecting/", plain_rejecting),
    path("quotas/", include("quotas.urls")),
    path("admin/", admin.site.urls),
]
