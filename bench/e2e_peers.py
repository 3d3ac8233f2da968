"""The end-to-end benchmark's reference points, as middleware the baseline server can run.

``BENCH_E2E_PEER`` (read by ``e2e_settings``) adds one to the demo with quotas off:

- ``ping``: one redis-py ``PING`` per request, on the same Redis. No Redis-backed check can
  cost less than one round trip, so this is the ceiling of any such limiter's share of the
  unenforced requests/s on this machine.
- ``drf``: DRF's ``UserRateThrottle`` (on the django-redis cache) for every request, at a rate
  that never refuses: what the throttle most Django projects already run costs here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.core.cache import caches
from django.http import HttpRequest, HttpResponseBase
from rest_framework.throttling import UserRateThrottle

__all__ = ["DRFThrottlePerRequest", "PingPerRequest"]


class PingPerRequest:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        from django_redis import get_redis_connection

        self.get_response = get_response
        self.client = get_redis_connection("default")

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        self.client.ping()
        return self.get_response(request)


class _Throttle(UserRateThrottle):
    rate = "1000000000/hour"
    cache = caches["default"]
    key = ""

    def get_cache_key(self, request: Any, view: Any) -> str:
        return self.key


class DRFThrottlePerRequest:
    """The throttle's whole cost (cache get, history update, cache set) per request.

    DRF keeps one timestamp per request in the history it re-pickles on every call, so a
    history that grew for the whole run would be slower than a real one under a real rate:
    the key changes every 100 requests (as in the check-cost benchmark), which flatters DRF a
    little."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.calls = 0

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        throttle: Any = _Throttle()
        throttle.key = f"{os.environ['BENCH_PREFIX']}-drf-{os.getpid()}-{self.calls // 100}"
        self.calls += 1
        throttle.allow_request(request, None)
        return self.get_response(request)
