"""URLs of the end-to-end benchmark's latency server: the demo's own, plus the same chat
endpoint without quota enforcement and with each reference point, so one server process
answers every mode and the sequential comparison is "same server, one run".

- ``/v1/chat/completions``: the demo's endpoint (its view, routed ahead of the demo's own
  patterns), quotas enforced (its throttle and ``QuotaMiddleware``).
- ``/bench/off/v1/chat/completions``: the same view without the throttle (the middleware
  then does nothing for it: it enforces only views that name the throttle).
- ``/bench/ping/...``: unenforced plus one Redis ``PING``; ``/bench/drf/...``: unenforced
  plus DRF's ``UserRateThrottle`` (see ``e2e_peers``).
"""

from typing import Any

from django.urls import path
from e2e_peers import DRFThrottlePerRequest, PingPerRequest

from project.gateway.views import ChatCompletionsView
from project.urls import urlpatterns as demo_urlpatterns


class Unenforced(ChatCompletionsView):
    throttle_classes: list[Any] = []


def _passthrough(request: Any) -> None:
    return None


class WithPing(Unenforced):
    peer = PingPerRequest(_passthrough)

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.peer(request)
        super().initial(request, *args, **kwargs)


class WithDRF(Unenforced):
    peer = DRFThrottlePerRequest(_passthrough)

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.peer(request)
        super().initial(request, *args, **kwargs)


# Every mode's view is found within the first four patterns, the enforced one last of them:
# behind the demo's own patterns (the admin, the API, the gateway's include) it took about
# 20 to 40 us more to resolve than the others, which the sequential figures counted as
# enforcement's. The same view as the demo's, as the demo serves it under WSGI.
urlpatterns = [
    path("bench/off/v1/chat/completions", Unenforced.as_view()),
    path("bench/ping/v1/chat/completions", WithPing.as_view()),
    path("bench/drf/v1/chat/completions", WithDRF.as_view()),
    path("v1/chat/completions", ChatCompletionsView.as_view()),
    *demo_urlpatterns,
]
