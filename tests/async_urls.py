"""Async views used only by the tests: ``async def`` views marked with ``@enforce_quota``
that stream over async generators (the shape of a view calling an async LLM client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from quotas.decorators import enforce_quota

USAGE = {"prompt_tokens": 11, "completion_tokens": 29, "total_tokens": 40}
WORD = "hello "  # one token in every encoding the tests use


def event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def word_event() -> bytes:
    return event({"choices": [{"delta": {"content": WORD}}]})


async def events_with_usage() -> AsyncIterator[bytes]:
    yield word_event()
    await asyncio.sleep(0)
    yield event({"choices": [], "usage": USAGE})
    yield b"data: [DONE]\n\n"


async def endless_words() -> AsyncIterator[bytes]:
    """Words until the client goes away (no usage chunk: the text produced is charged)."""
    while True:
        yield word_event()
        await asyncio.sleep(0.01)


async def failing_words() -> AsyncIterator[bytes]:
    yield word_event()
    yield word_event()
    raise RuntimeError("the upstream dropped the stream")


def sync_words() -> Iterator[bytes]:
    yield word_event()
    yield word_event()
    yield event({"choices": [], "usage": USAGE})


def sse(content: object) -> StreamingHttpResponse:
    return StreamingHttpResponse(content, content_type="text/event-stream")


@csrf_exempt
@enforce_quota
async def async_stream(request):
    return sse(events_with_usage())


@csrf_exempt
@enforce_quota
async def async_endless(request):
    return sse(endless_words())


@csrf_exempt
@enforce_quota
async def async_failing(request):
    return sse(failing_words())


@csrf_exempt
@enforce_quota
async def async_json(request):
    await asyncio.sleep(0)
    return JsonResponse({"id": "x", "usage": USAGE})


@csrf_exempt
@enforce_quota
def sync_stream(request):
    return sse(sync_words())


urlpatterns = [
    path("async-stream/", async_stream),
    path("async-endless/", async_endless),
    path("async-failing/", async_failing),
    path("async-json/", async_json),
    path("sync-stream/", sync_stream),
]
