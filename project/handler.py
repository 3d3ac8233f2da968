"""Django's ASGI handler, with the threads for each request's thread-sensitive work kept.

Django runs each ASGI request in an ``asgiref`` ``ThreadSensitiveContext``: the request's
thread-sensitive sync work (the ``request_started`` and ``request_finished`` signals' sync
receivers, closing the response) runs in one thread of its own, so the database connection it
opens is the one it closes. By default asgiref starts a new thread for that in every request,
and one more to join it when the request ends, and the event loop waits each time for the new
thread to start: under load, with the GIL busy, that stalled the loop for about a millisecond
per request, more than the quota check itself. This handler gives each request a
one-thread executor from a pool instead (asgiref's ``ThreadSensitiveContext(executor=...)``):
still one thread per request at a time, so a connection is still opened and closed in one
thread, but no thread is started or joined per request. Executors idle past ``KEEP_IDLE``
are shut down (off the event loop).

One difference from asgiref's default: a coroutine that outlives its request and then makes
a thread-sensitive ``sync_to_async`` call gets asgiref's ``RuntimeError`` instead of a thread
of its own. Django closes a streaming response's iterator inside the request (also when the
client goes away), so streams are metered and settled before the request ends.
"""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

__all__ = ["PooledASGIHandler"]

# ``ThreadSensitiveContext(executor=...)`` is recent in asgiref; without it, Django's own way.
POOLED = "executor" in inspect.signature(ThreadSensitiveContext).parameters


class PooledASGIHandler(ASGIHandler):
    """``django.core.handlers.asgi.ASGIHandler`` reusing its per-request sync threads."""

    KEEP_IDLE = 64

    def __init__(self) -> None:
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not POOLED:
            await super().__call__(scope, receive, send)  # Django's error, or Django's way
            return
        executor = self._idle.pop() if self._idle else _new_executor()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self._release(executor)

    def _release(self, executor: ThreadPoolExecutor) -> None:
        if len(self._idle) < self.KEEP_IDLE:
            self._idle.append(executor)
        else:  # shutdown() joins the thread: never on the event loop
            threading.Thread(target=executor.shutdown, daemon=True).start()


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="django-sync")
