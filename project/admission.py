"""An ASGI wrapper that admits at most ``limit`` requests at a time, counted from a request's
start to its response's headers (not to the end of its body: a stream, once started, no
longer counts).

Django runs each request's sync code (its sync middleware and views) under ASGI in a thread of
the request's own. Three hundred requests arriving at once are three hundred runnable
threads, and the event loop's thread then gets a three-hundredth of the CPU and the GIL:
every stream already running stalls. Admitting a few at a time keeps the loop responsive and
serves the burst as fast (the CPU is the limit either way).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["AdmissionLimit"]


class AdmissionLimit:
    """At most ``limit`` HTTP requests between their start and their response's headers."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        slots = self._slots
        await slots.acquire()
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                slots.release()

        async def send_and_release(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
