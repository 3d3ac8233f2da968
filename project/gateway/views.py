"""``POST /v1/chat/completions``: an OpenAI-compatible endpoint guarded by the token quota.

The request is validated first (a malformed request is answered 400 and never touches the
budget), then ``TokenQuotaThrottle`` reserves its estimate, then the fake model (or the
upstream API, through the quota-aware client ``quotas.llm``: see ``upstream.py``) answers
with a true ``usage`` block, from which the reservation is settled. Streams end with a chunk
carrying ``usage`` (always, not only when ``stream_options.include_usage`` asks for it) so
they settle exactly too. Under ASGI a stream is an async generator on the event loop: the
fake model's, and the upstream's (opened and read with the async client, ``AsyncOpenAI``).

With an upstream, a request that says ``X-Quota-Degrade: allow`` may be served by the
user's plan's degradation ladder when the requested model refuses (the throttle's 429 among
them); ``X-Quota-Rung`` and the answer's ``quota_rung`` say which rung served. Without that
header the OpenAI contract is unchanged: a 429 with an exact ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase, StreamingHttpResponse
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from project.gateway import fake_model
from project.gateway.openapi import CHAT_RESPONSES
from project.gateway.serializers import ChatCompletionRequestSerializer, first_error
from project.gateway.threads import OPENS_ON_LOOP, OpenOnLoop
from project.gateway.upstream import (
    RUNG_HEADER,
    forward,
    may_degrade,
    open_async_stream,
    open_stream_on_loop,
)
from quotas.api.schema import documented
from quotas.conf import quota_settings
from quotas.core.bounds import MAX_JSON_DEPTH, InvalidRequest, check_depth
from quotas.enforcement import prompt_tokens_of
from quotas.throttling import QuotaRejected, TokenQuotaThrottle

__all__ = ["ChatCompletionsView"]


class GatewayError(exceptions.APIException):
    """An error answered in OpenAI's shape, ``{"error": {...}}``, plus DRF's ``detail``."""

    def __init__(
        self, status_code: int, message: str, *, code: str, kind: str, param: str | None = None
    ) -> None:
        super().__init__()
        self.status_code = status_code
        error = {"message": message, "type": kind, "param": param, "code": code}
        # Set after __init__: DRF would turn a dict passed in into strings and lists.
        self.detail = {"detail": message, "error": error}  # type: ignore[assignment]


def invalid_request(
    message: str, param: str | None = None, code: str = "invalid_request"
) -> GatewayError:
    """A 400 in the quota app's vocabulary: ``invalid_request`` (``param`` names the field when
    one is at fault) or ``request_body_too_large``, ``type`` ``invalid_request_error``."""
    return GatewayError(400, message, code=code, kind="invalid_request_error", param=param)


class JSONOnlyNegotiation(DefaultContentNegotiation):
    """Always render JSON (a stream bypasses rendering): a client that sends ``Accept:
    text/event-stream`` for a stream must not get 406."""

    def select_renderer(self, request: Request, renderers: list[Any], format_suffix: Any) -> Any:
        return renderers[0], renderers[0].media_type


class ChatCompletionsView(APIView):
    """OpenAI's chat completions, answered by the fake model or the upstream API."""

    throttle_classes = [TokenQuotaThrottle]
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = JSONOnlyNegotiation

    def get_throttles(self) -> list[Any]:
        # Read per request: the benchmark flips GATEWAY_ENFORCE_QUOTAS between runs.
        if not settings.GATEWAY.get("ENFORCE_QUOTAS", True):
            return []
        return super().get_throttles()

    def check_throttles(self, request: Request) -> None:
        """Validate before the throttle reserves: a bad request costs the user nothing."""
        if request.method != "POST":
            return  # nothing is served (405, or OPTIONS), so nothing is reserved
        self.chat = validated_chat_request(request)
        try:
            super().check_throttles(request)
        except QuotaRejected as exc:
            if not _ladder_may_serve(request, exc):
                raise
            # The requested model refused; the ladder below it may serve (the client
            # tries the requested model once more, then the plan's rungs).

    @documented(
        request=ChatCompletionRequestSerializer,
        responses=CHAT_RESPONSES,
        headers=True,
        operation_id="createChatCompletion",
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        if settings.GATEWAY.get("UPSTREAM_URL"):
            return self.forward_upstream(request)
        answer = fake_model.answer(
            self.chat["model"],
            request.data,  # as sent: counted exactly as the estimator counted it
            prompt_tokens=prompt_tokens_of(request),  # the estimator's count, when it ran
            natural_tokens=settings.GATEWAY["FAKE_ANSWER_TOKENS"],
            max_tokens=self.chat.get("max_completion_tokens") or self.chat.get("max_tokens"),
        )
        if self.chat.get("stream"):
            chunks = completion_chunks(answer)
            seconds = float(settings.GATEWAY.get("FAKE_STREAM_SECONDS") or 0)
            if isinstance(request._request, ASGIRequest):  # on the event loop, not a thread
                return async_sse_response(paced_async(chunks, seconds))
            return sse_response(paced(chunks, seconds))
        return Response(completion_object(answer))

    def forward_upstream(self, request: Request) -> Any:
        # Under ASGI a stream is forwarded with the async client and read on the event loop
        # (no thread per stream); everything else with the sync client, in this thread.
        on_loop = bool(self.chat.get("stream")) and isinstance(request._request, ASGIRequest)
        body = dict(request.data)
        if on_loop and getattr(request._request, OPENS_ON_LOOP, False):
            # In the pool: the opening is left to the wrapper, on the event loop, so this
            # thread does not wait for the upstream's first answer.
            async def finish() -> HttpResponseBase:
                return self.upstream_response(await open_stream_on_loop(request, body), True)

            return OpenOnLoop(finish)
        answer = open_async_stream(request, body) if on_loop else forward(request, body)
        return self.upstream_response(answer, on_loop)

    def upstream_response(self, answer: Any, on_loop: bool) -> Any:
        """The HTTP answer of what the upstream call gave (``on_loop``: an async stream)."""
        if isinstance(answer, HttpResponseBase):  # refused, deferred, or an upstream error
            return answer
        rung = getattr(answer, "quota_rung", "preferred")
        if on_loop:
            response: Any = async_sse_response(_async_chunk_batches(answer))
        elif self.chat.get("stream"):
            response = sse_response(_chunk_dicts(answer))
        else:
            response = Response(answer.model_dump(exclude_unset=True))
        response[RUNG_HEADER] = rung
        return response


def _chunk_dicts(stream: Any) -> Iterator[dict[str, Any]]:
    """The chunks of the client's stream as JSON objects; closing this closes (and so
    settles) the stream, when the client goes away too."""
    try:
        for chunk in stream:
            yield chunk.model_dump(exclude_unset=True)
    finally:
        stream.close()


async def _async_chunk_batches(stream: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """``_chunk_dicts`` for the async client's stream, one chunk per batch as it comes;
    closing this (the stream ended, failed, or the client went away: Django cancels the
    response) closes the stream, which settles what it produced."""
    try:
        async for chunk in stream:
            yield [chunk.model_dump(exclude_unset=True)]
    finally:
        closed = stream.close()  # a cached answer's stream closes at once
        if inspect.isawaitable(closed):
            await closed


def _ladder_may_serve(request: Request, refusal: QuotaRejected) -> bool:
    """Whether a throttle refusal may go on to the degradation ladder: a 429 of the user's
    budget (not of too many rejected attempts), an upstream, and the client's consent."""
    error = refusal.detail.get("error", {}) if isinstance(refusal.detail, dict) else {}
    return (
        refusal.status_code == 429
        and error.get("type") != "attempts"
        and bool(settings.GATEWAY.get("UPSTREAM_URL"))
        and may_degrade(request)
    )


def body_limit() -> int:
    """The largest body read: Django's upload limit, and no more than the quota estimator
    reads. Larger bodies are bad input (400, as Django itself answers), so a 413 always
    means "these tokens can never fit your plan"."""
    quota_limit = quota_settings.MAX_BODY_BYTES
    return min(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or quota_limit, quota_limit)


def validated_chat_request(request: Request) -> dict[str, Any]:
    """The request's known fields, validated; a 400 ``GatewayError`` otherwise."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > body_limit():
        raise invalid_request(
            f"Request body of {length} bytes is over the {body_limit()}-byte limit.",
            code="request_body_too_large",
        )
    try:
        data = request.data
    except exceptions.ParseError as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc.detail}") from exc
    except RecursionError as exc:  # the JSON parser's own nesting limit (about 1000 levels)
        raise invalid_request(
            f"The request body nests objects and lists more than {MAX_JSON_DEPTH} levels deep."
        ) from exc
    serializer = ChatCompletionRequestSerializer(data=data)
    if not serializer.is_valid():
        # Too deep is the first thing to say (the parser's own recursion limit depends on the
        # Python version: 3.12 parses what 3.11 refused). Only a refused body pays for the walk;
        # a valid one is walked once, by the estimate.
        try:
            check_depth(data)
        except InvalidRequest as exc:
            raise invalid_request(str(exc)) from exc
        param, message = first_error(serializer.errors)
        raise invalid_request(f"Invalid '{param}': {message}" if param else message, param or None)
    return dict(serializer.validated_data)


# -- OpenAI's response objects -----------------------------------------------------------------
def completion_object(answer: fake_model.FakeAnswer) -> dict[str, Any]:
    """A ``chat.completion`` object, field for field as OpenAI sends it."""
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage,
    }


def completion_chunks(answer: fake_model.FakeAnswer) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream: the role, the content a few tokens
    at a time, the finish reason, then a chunk with no choices and the ``usage``."""
    head = {
        "id": _completion_id(),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": answer.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in answer.pieces:
        yield chunk({"content": piece})
    yield chunk({}, answer.finish_reason)
    yield {**head, "choices": [], "usage": answer.usage}


def sse_response(chunks: Iterable[dict[str, Any]]) -> StreamingHttpResponse:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``."""

    def events() -> Iterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass the events on as they come
    return response


def paced(chunks: Iterable[dict[str, Any]], seconds: float) -> Iterator[dict[str, Any]]:
    """The chunks spread over ``seconds`` (a model generating), sleeping between them."""
    chunks = list(chunks)
    for index, chunk in enumerate(chunks):
        if index and seconds > 0:
            time.sleep(seconds / len(chunks))
        yield chunk


# Under ASGI the fake model sends what it produced every TICK seconds, as a network
# upstream's TCP segments carry several events: one wake-up per tick, not per event.
TICK = 0.05


async def paced_async(
    chunks: Iterable[dict[str, Any]], seconds: float
) -> AsyncIterator[list[dict[str, Any]]]:
    """``paced`` for the event loop (``asyncio.sleep``): the chunks due by each tick, the
    first at once."""
    chunks, loop = list(chunks), asyncio.get_running_loop()
    start, sent = loop.time(), 0
    while sent < len(chunks):
        elapsed = loop.time() - start
        due = len(chunks) if seconds <= 0 else int(elapsed / seconds * len(chunks)) + 1
        due = min(max(due, sent + 1), len(chunks))
        yield chunks[sent:due]
        sent = due
        if sent < len(chunks):
            await asyncio.sleep(TICK)


def async_sse_response(batches: AsyncIterator[list[dict[str, Any]]]) -> StreamingHttpResponse:
    """``sse_response`` over an async iterator of chunk batches (served under ASGI without a
    thread): one write per batch."""

    async def events() -> AsyncIterator[bytes]:
        async for batch in batches:
            yield b"".join(
                f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode() for chunk in batch
            )
        yield b"data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
