"""Streams settled by what they produced: ``StreamMeter`` wraps a streaming response's body
and settles its reservation once, when the stream ends, fails or is closed early (the client
went away), with the ``usage`` of a final chunk if one was sent, else the prompt plus the
``delta.content`` text produced so far (counted with tiktoken)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from quotas import services
from quotas.conf import quota_settings
from quotas.core.bounds import MAX_TOKENS
from quotas.core.encodings import count_text_tokens, encoding_for_model

__all__ = ["StreamMeter", "clean_usage"]

logger = logging.getLogger("quotas")


def _settle_with(reservation: Any, usage: dict[str, int]) -> services.Settlement:
    return services.settle(
        reservation,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
    )


def clean_usage(usage: Any) -> dict[str, int]:
    """The token figures of an OpenAI ``usage`` block that are counts of tokens."""
    if not isinstance(usage, dict):
        return {}
    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    # A figure that is not a count of tokens is ignored (the estimate stands for it).
    clean = {
        name: usage[name]
        for name in fields
        if isinstance(usage.get(name), int)
        and not isinstance(usage[name], bool)
        and 0 <= usage[name] <= MAX_TOKENS
    }
    if "total_tokens" in clean and len(clean) == 3:
        del clean["total_tokens"]  # the parts are the more detailed record
    return clean


class StreamMeter:
    """Wraps a streaming body; settles once when it ends, fails or is closed early."""

    def __init__(self, content: Iterator[bytes], reservation: Any, prompt: int | None) -> None:
        self._content = iter(content)
        self._reservation = reservation
        self._prompt = prompt
        self._usage: dict[str, int] = {}
        self._text: list[str] = []
        self._partial = b""
        self._done = False

    def __iter__(self) -> StreamMeter:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._content)
        except BaseException:
            self.close()
            raise
        self._observe(chunk if isinstance(chunk, bytes) else str(chunk).encode())
        return chunk

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        closer = getattr(self._content, "close", None)
        if closer:
            closer()
        if self._reservation.settlements:  # the view settled it itself
            return
        try:
            _settle_with(self._reservation, self._actual())
        except Exception:  # never let settling break the response; the TTL sweep charges it
            logger.exception("quotas: could not settle stream %s", self._reservation.id)

    def _observe(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if not data or data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self._usage = clean_usage(event.get("usage")) or self._usage
        for choice in event.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                self._text.append(content)

    def _actual(self) -> dict[str, int]:
        if self._usage:
            return self._usage
        encoding = encoding_for_model(
            self._reservation.model,
            fallback=quota_settings.FALLBACK_ENCODING,
            allow_download=quota_settings.ALLOW_ENCODING_DOWNLOAD,
        )
        completion = count_text_tokens(encoding, "".join(self._text))
        # A view that gave its own estimate has no counted prompt: only output is charged.
        return {"prompt_tokens": self._prompt or 0, "completion_tokens": completion}
