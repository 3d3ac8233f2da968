"""The demo's ASGI stack: no middleware sends a request through a thread and back, static
files are still served, and each request's thread-sensitive work runs in one thread kept from
one request to the next (``project.handler``), not in a thread started per request; and the
demo's servers freeze what the app loads out of the garbage collector's full collections."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.signals import request_finished, request_started
from django.test import AsyncClient, Client

from project.handler import POOLED, PooledASGIHandler

ADMIN_CSS = "admin/css/base.css"


def test_no_middleware_of_the_demo_adapts_an_asgi_request_to_sync(settings, caplog):
    settings.DEBUG = True  # Django logs each adaptation only then
    with caplog.at_level(logging.DEBUG, logger="django.request"):
        PooledASGIHandler()
    adapted = [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]
    assert adapted == []


@pytest.mark.parametrize("autorefresh", [False, True], ids=["collected", "autorefresh"])
def test_static_files_are_served_under_asgi_and_wsgi(settings, autorefresh):
    settings.WHITENOISE_USE_FINDERS = True  # the admin's files, without collectstatic
    settings.WHITENOISE_AUTOREFRESH = autorefresh
    path = f"/{settings.STATIC_URL.strip('/')}/{ADMIN_CSS}"
    answers = [async_to_sync(AsyncClient().get)(path), Client().get(path)]
    for response in answers:
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/css")
        assert b"".join(response.streaming_content)
    # Anything else goes on to Django (here: no such page).
    missing = async_to_sync(AsyncClient().get)(f"/{settings.STATIC_URL.strip('/')}/nope.css")
    assert missing.status_code == 404


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def _request(handler: PooledASGIHandler, path: str) -> int:
    sent: list[dict[str, Any]] = []
    body = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await asyncio.Event().wait()  # the client stays (Django cancels this when done)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await handler(_scope(path), receive, send)
    return int(sent[0]["status"])


@pytest.fixture
def signal_threads() -> Any:
    """Which thread ran each request's ``request_started`` and ``request_finished``."""
    seen: dict[str, list[threading.Thread]] = {"started": [], "finished": []}
    barrier: list[threading.Barrier] = []

    def started(**kwargs: Any) -> None:
        seen["started"].append(threading.current_thread())
        if barrier:
            barrier[0].wait()  # every request waits here until all have started

    def finished(**kwargs: Any) -> None:
        seen["finished"].append(threading.current_thread())

    request_started.connect(started, dispatch_uid="test-started")
    request_finished.connect(finished, dispatch_uid="test-finished")
    try:
        yield seen, barrier
    finally:
        request_started.disconnect(dispatch_uid="test-started")
        request_finished.disconnect(dispatch_uid="test-finished")


@pytest.mark.skipif(not POOLED, reason="this asgiref has no ThreadSensitiveContext(executor=)")
def test_a_request_s_sync_work_runs_in_one_thread_reused_by_the_next(signal_threads):
    seen, _ = signal_threads
    handler = PooledASGIHandler()

    async def one_after_another() -> list[int]:
        return [await _request(handler, "/no-such-page/") for _ in range(3)]

    assert async_to_sync(one_after_another)() == [404] * 3
    threads = seen["started"]
    assert len(threads) == 3 and threads == seen["finished"]  # one thread per request ...
    assert threads[0] is threads[1] is threads[2]  # ... kept, not started for each request
    assert threads[0] is not threading.current_thread()


def test_requests_in_flight_at_once_each_have_a_thread_of_their_own(signal_threads):
    seen, barrier = signal_threads
    # Three requests must be in request_started at once: one thread for all would time out.
    barrier.append(threading.Barrier(3, timeout=10))
    handler = PooledASGIHandler()

    async def at_once() -> list[int]:
        return list(await asyncio.gather(*(_request(handler, "/x/") for _ in range(3))))

    assert async_to_sync(at_once)() == [404] * 3
    assert len({id(thread) for thread in seen["started"]}) == 3
    assert sorted(map(id, seen["started"])) == sorted(map(id, seen["finished"]))
    assert len(handler._idle) == (3 if POOLED else 0)  # kept for the next requests


@pytest.mark.parametrize("module", ["project.asgi", "project.wsgi"])
def test_the_loaded_app_is_left_out_of_full_garbage_collections(module):
    # In a process of its own, as a server loads it: what the app loads is frozen, so a full
    # collection walks only what came after (a fraction of what it would walk otherwise).
    code = f"import gc\nimport {module}\nprint(gc.get_freeze_count(), len(gc.get_objects()))\n"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    frozen, walked = map(int, run.stdout.split()[-2:])
    assert frozen > 50_000
    assert walked < frozen / 10
