"""The demo's static files (the admin's CSS and scripts), served by WhiteNoise from a
middleware that is sync- and async-capable.

WhiteNoise's own middleware is sync only. In Django's async stack (``project.asgi``) every
request would then pass through it in a thread and come back to the event loop, whether it
asks for a static file or not: asgiref starts a thread per request for that hop, and one
more to join it, and the event loop waits for both to start. Under load that cost more of
the event loop than the whole quota check. Here, under ASGI, only a request for a static
file goes to WhiteNoise (the file opened in a worker thread); every other request goes on
to the next middleware on the event loop. Under WSGI it is WhiteNoise's middleware as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware

__all__ = ["StaticFilesMiddleware"]


class StaticFilesMiddleware:
    """``whitenoise.middleware.WhiteNoiseMiddleware`` (same settings), async-capable."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.whitenoise = WhiteNoiseMiddleware(get_response)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self._acall(request)
        return self.whitenoise(request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        whitenoise = self.whitenoise
        if whitenoise.autorefresh:  # DEBUG: looked up on disk each time
            found = await sync_to_async(whitenoise.find_file, thread_sensitive=False)(
                request.path_info
            )
        else:  # the files collected at start, in memory
            found = whitenoise.files.get(request.path_info)
        if found is None:
            return await self.get_response(request)
        serve = sync_to_async(whitenoise.serve, thread_sensitive=False)
        return await serve(found, request)  # type: ignore[no-any-return]
