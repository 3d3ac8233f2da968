"""The demo's ASGI application with an event-loop lag sampler, for the tests only.

Every 10 ms a task on the server's event loop notes how late its ``asyncio.sleep`` woke up:
that lateness is how long the loop was stalled (by blocking code, or too much work).
``GET /__loop_lag/`` answers the lags noted since the last ``GET /__loop_lag/?reset``, in
milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from project.asgi import application as django_application

INTERVAL = 0.01
_lags: list[float] = []
_sampler: list[asyncio.Task] = []


async def _sample() -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(INTERVAL)
        _lags.append((loop.time() - start - INTERVAL) * 1000)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and not _sampler:
        _sampler.append(asyncio.get_running_loop().create_task(_sample()))
    if scope["type"] == "http" and scope["path"] == "/__loop_lag/":
        if scope.get("query_string") == b"reset":
            _lags.clear()

        body = json.dumps(sorted(_lags)).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await django_application(scope, receive, send)
