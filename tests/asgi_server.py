"""A real uvicorn server of the demo project (one worker process, ASGI), for integration
tests: the same database, Redis and quota key prefix as ``tests.gateway_server``'s gunicorn,
serving ``tests.asgi_lag`` (the demo's ASGI app plus a loop-lag sampler)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from django.conf import settings

from tests.gateway_server import _stop, _wait_until_ready, server_env

__all__ = ["chunked_lines", "running_asgi_gateway"]


async def chunked_lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """The lines of a chunked body (``Transfer-Encoding: chunked``), as they arrive."""
    pending = b""
    while True:
        size = int((await asyncio.wait_for(reader.readline(), 60)).strip() or b"0", 16)
        if size == 0:
            break
        pending += await reader.readexactly(size + 2)
        pending = pending[:-2] if pending.endswith(b"\r\n") else pending
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode()


@contextmanager
def running_asgi_gateway(prefix: str, *, log: IO[bytes] | None = None, **env: str) -> Iterator[int]:
    """Start uvicorn (one worker) on a free port; yield the port once it answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = int(listener.getsockname()[1])
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.asgi_lag:application",
        f"--fd={listener.fileno()}",
        "--lifespan=off",
        "--log-level=warning",
        "--no-access-log",
        "--timeout-graceful-shutdown=3",
    ]
    with contextlib.ExitStack() as stack:
        output = log if log is not None else stack.enter_context(tempfile.TemporaryFile())
        server = subprocess.Popen(
            command,
            cwd=Path(settings.BASE_DIR),
            env=server_env(prefix, env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(listener.fileno(),),
        )
        listener.close()
        try:
            _wait_until_ready(server, port, output)
            yield port
        finally:
            _stop(server)
