"""The demo's URLs plus a sign-in door for the headless browser (tests only): ``login/<id>/``
signs that user in and redirects to ``next``."""

from __future__ import annotations

from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path

from project.urls import urlpatterns as demo


def sign_in(request: HttpRequest, user_id: int) -> HttpResponse:
    user = get_user_model().objects.get(pk=user_id)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponseRedirect(request.GET.get("next", "/admin/"))


urlpatterns = [path("test-login/<int:user_id>/", sign_in), *demo]
