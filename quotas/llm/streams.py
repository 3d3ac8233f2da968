"""Streams that settle once, when they end or are closed: with the provider's usage chunk
(the client asks for it with ``stream_options.include_usage``), else with the prompt as
estimated plus the text produced so far. A caller that did not ask for the usage chunk does
not see it, so the stream is exactly the SDK's.

Also the stream of a cached answer (the cache rung serving a streamed request).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from openai.types.chat import ChatCompletionChunk

from quotas.llm.usage import usage_figures

__all__ = ["AsyncMeteredStream", "ChunkMeter", "MeteredStream", "cached_chunks"]

# Called once at the end: (usage figures or {}, text produced, the answer to cache or None).
OnEnd = Callable[[dict[str, int], str, "dict[str, Any] | None"], Any]


class ChunkMeter:
    """What a stream produced so far: text, usage, and the answer it adds up to."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.usage: dict[str, int] = {}
        self.head: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.plain = True  # one choice of text only (tool calls are not cached)

    def observe(self, chunk: Any) -> bool:
        """Count one chunk; whether it is the usage chunk (no choices, a ``usage``)."""
        if not self.head:
            self.head = {"id": chunk.id, "created": chunk.created, "model": chunk.model}
        usage = usage_figures(getattr(chunk, "usage", None))
        self.usage = usage or self.usage
        for choice in chunk.choices or []:
            delta = choice.delta
            if choice.index != 0 or getattr(delta, "tool_calls", None):
                self.plain = False
            if delta is not None and delta.content:
                self.text.append(delta.content)
            self.finish_reason = choice.finish_reason or self.finish_reason
        return bool(usage) and not chunk.choices

    def answer(self) -> dict[str, Any] | None:
        """The whole answer as a ``chat.completion``, when the stream ended complete."""
        if not (self.plain and self.finish_reason and self.usage and self.head):
            return None
        message = {"role": "assistant", "content": "".join(self.text)}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": self.usage}


class MeteredStream:
    """A ``Stream`` of chunks that calls ``on_end`` once when it ends, fails or is closed."""

    def __init__(self, stream: Any, on_end: OnEnd, *, show_usage: bool, rung: str) -> None:
        self._stream = stream
        self._chunks = iter(stream)
        self._on_end = on_end
        self._show_usage = show_usage
        self._meter = ChunkMeter()
        self._ended = False
        self.quota_rung = rung
        self.response = getattr(stream, "response", None)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._end(complete=True)
                raise
            except BaseException:
                self._end(complete=False)
                raise
            if not self._meter.observe(chunk) or self._show_usage:
                return chunk

    def close(self) -> None:
        """Stop reading (the connection is released) and settle what was produced."""
        try:
            self._stream.close()
        finally:
            self._end(complete=False)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end(self, *, complete: bool) -> None:
        if self._ended:
            return
        self._ended = True
        meter = self._meter
        self._on_end(meter.usage, "".join(meter.text), meter.answer() if complete else None)


class AsyncMeteredStream:
    """``MeteredStream`` for an ``AsyncStream``; ``on_end`` is awaited."""

    def __init__(
        self, stream: Any, on_end: Callable[..., Awaitable[Any]], *, show_usage: bool, rung: str
    ) -> None:
        self._stream = stream
        self._chunks = stream.__aiter__()
        self._on_end = on_end
        self._show_usage = show_usage
        self._meter = ChunkMeter()
        self._ended = False
        self.quota_rung = rung
        self.response = getattr(stream, "response", None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                await self._end(complete=True)
                raise
            except BaseException:
                await self._end(complete=False)
                raise
            if not self._meter.observe(chunk) or self._show_usage:
                return chunk

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            await self._end(complete=False)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _end(self, *, complete: bool) -> None:
        if self._ended:
            return
        self._ended = True
        meter = self._meter
        answer = meter.answer() if complete else None
        await self._on_end(meter.usage, "".join(meter.text), answer)


def cached_chunks(answer: dict[str, Any], *, show_usage: bool) -> list[ChatCompletionChunk]:
    """The chunks of a cached ``chat.completion``, as a provider would stream it."""
    head = {
        "id": answer.get("id") or f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": answer.get("created") or int(time.time()),
        "model": answer.get("model") or "",
    }
    chunks = []
    for choice in answer.get("choices") or []:
        message = choice.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content") or ""}
        index = choice.get("index", 0)
        chunks.append({**head, "choices": [{"index": index, "delta": delta}]})
        ending = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        chunks.append({**head, "choices": [ending]})
    if show_usage and answer.get("usage"):
        chunks.append({**head, "choices": [], "usage": answer["usage"]})
    return [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]


class CachedStream:
    """A stream (sync and async) of a cached answer's chunks."""

    def __init__(self, chunks: list[ChatCompletionChunk], rung: str) -> None:
        self._chunks = iter(chunks)
        self.quota_rung = rung
        self.response = None

    def __iter__(self) -> Iterator[Any]:
        return self._chunks

    def __next__(self) -> Any:
        return next(self._chunks)

    def __aiter__(self) -> CachedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._chunks = iter(())

    def __enter__(self) -> CachedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
