"""Middleware for ``make run`` only: lets ``project.devtools.run`` tell its own web server
from another program that answers on the same port."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from project.devtools.run import RUN_ID_ENV, RUN_ID_HEADER

__all__ = ["RunIdMiddleware"]


class RunIdMiddleware:
    """Adds this run's id (``DEMO_RUN_ID``) to every response, as ``X-Demo-Run`` (under WSGI
    and ASGI alike)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.run_id = os.environ.get(RUN_ID_ENV, "")
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        response = self.get_response(request)
        response[RUN_ID_HEADER] = self.run_id
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        response[RUN_ID_HEADER] = self.run_id
        return response
