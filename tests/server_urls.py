"""The demo's URLs plus ``/boom/``, a view that raises (see ``tests.server_settings``)."""

from django.http import HttpRequest, HttpResponse
from django.urls import path

from project.urls import urlpatterns as demo_urlpatterns


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the boom view failed on purpose")


urlpatterns = [path("boom/", boom), *demo_urlpatterns]
