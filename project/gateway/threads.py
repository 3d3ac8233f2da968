"""Sync views under ASGI, in a bounded pool of threads.

Django runs a sync view under ASGI in a thread of the request's own and keeps that thread's
database connection open until the response has been sent: for a stream, its whole length.
Three hundred concurrent streams would hold three hundred connections (PostgreSQL refuses
past ``max_connections``). ``in_pool`` wraps the gateway's sync DRF view as an async view that
runs it in this process's pool of ``GATEWAY["SYNC_THREADS"]`` threads, so a stream holds no
thread and no connection while it streams: its body is an async generator on the event loop.

A pooled view may leave work that must finish on the event loop to the wrapper: it returns an
``OpenOnLoop`` (the gateway does so for an upstream stream's opening, which waits for the
upstream's first answer), and the wrapper awaits it there, so the pool's thread is free for
the next request meanwhile.

The pool's threads live as long as the process, so each keeps its database connection from
one request to the next (a pool of ``SYNC_THREADS`` connections: opening a PostgreSQL
connection per request cost more than the rest of the request on the test machine); a
connection that failed is closed, and the next request opens a new one. (Django advises
against ``CONN_MAX_AGE`` under ASGI because each request runs in a thread of its own; these
threads are not.)
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpResponse, HttpResponseBase

__all__ = ["OPENS_ON_LOOP", "OpenOnLoop", "in_pool"]

# Set on a request whose view runs in the pool: the view may answer with an ``OpenOnLoop``.
OPENS_ON_LOOP = "gateway_opens_on_loop"

_pool: list[ThreadPoolExecutor] = []


def _executor() -> ThreadPoolExecutor:
    if not _pool:
        size = int(settings.GATEWAY.get("SYNC_THREADS", 4))
        _pool.append(ThreadPoolExecutor(max_workers=size, thread_name_prefix="gateway"))
    return _pool[0]


class OpenOnLoop(HttpResponse):
    """What a pooled view answers when its response must be finished on the event loop:
    the response is what ``finish()`` gives, with the headers the view's framework set on
    this placeholder (DRF's ``Allow`` and ``Vary``) where it has none of its own."""

    def __init__(self, finish: Callable[[], Awaitable[HttpResponseBase]]) -> None:
        super().__init__()
        self.finish = finish

    async def response(self) -> HttpResponseBase:
        final = await self.finish()
        for name, value in self.items():
            if name.lower() not in ("content-type", "content-length") and name not in final:
                final[name] = value
        return final


def in_pool(view: Callable[..., Any]) -> Callable[..., Any]:
    """``view`` (sync) as an async view run in the bounded pool (attributes kept, so
    ``QuotaMiddleware`` still sees the DRF view's throttles and CSRF exemption)."""

    def call(request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return view(request, *args, **kwargs)
        finally:
            _drop_broken_connections()

    @functools.wraps(view)
    async def pooled(request: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(request, OPENS_ON_LOOP, True)
        run = sync_to_async(call, thread_sensitive=False, executor=_executor())
        response = await run(request, *args, **kwargs)
        if isinstance(response, OpenOnLoop):  # the pool's thread is already free
            response = await response.response()
        return response

    return pooled


def _drop_broken_connections() -> None:
    """Close this thread's database connections that failed (kept otherwise)."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and connection.errors_occurred:
            if not connection.is_usable():
                connection.close()
            connection.errors_occurred = False
        if connection.in_atomic_block:  # a view left a transaction open: never reuse it
            connection.close()
