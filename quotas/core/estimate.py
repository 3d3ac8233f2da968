"""Token estimates of OpenAI-style requests, made before the LLM call. Framework-free.

An estimate is the prompt counted with tiktoken plus the output allowance: the request's
``max_completion_tokens`` / ``max_tokens``, or (``output_tokens=None``) the plan's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quotas.core.tokens import count_chat_tokens, count_text_tokens, encoding_for_model

__all__ = ["Estimate", "InvalidRequest", "estimate_request", "positive_int_or_none"]


class InvalidRequest(ValueError):
    """The request body cannot be estimated; the message names the offending field."""


@dataclass(frozen=True)
class Estimate:
    """Tokens to reserve: ``prompt_tokens + output_tokens``.

    ``output_tokens`` is ``None`` when the request names no output limit: the plan's default
    output allowance applies (added where the plan is known, inside the reserve script).
    """

    model: str
    prompt_tokens: int
    output_tokens: int | None

    @property
    def named_tokens(self) -> int:
        """Prompt plus the output limit the request named (if any)."""
        return self.prompt_tokens + (self.output_tokens or 0)


def positive_int_or_none(body: Mapping[str, Any], field: str) -> int | None:
    """``body[field]`` as a positive integer, ``None`` when absent; anything else is invalid."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{field}' must be a positive integer, got {value!r}.")
    return value


def _messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of message objects.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"'messages[{index}]' must be an object.")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(f"'messages[{index}].content' must be a string or a list.")
    return messages


def _texts(body: Mapping[str, Any], field: str) -> list[str]:
    value = body[field]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest(f"'{field}' must be a string or a list of strings.")
    return texts


def prompt_tokens(body: Mapping[str, Any], model: str, *, fallback: str, download: bool) -> int:
    """Prompt tokens of a chat (``messages``), completion (``prompt``) or ``input`` body."""
    encoding = encoding_for_model(model, fallback=fallback, allow_download=download)
    if "messages" in body:
        return count_chat_tokens(encoding, _messages(body))
    for field in ("prompt", "input"):
        if field in body:
            return sum(count_text_tokens(encoding, t) for t in _texts(body, field))
    raise InvalidRequest("The body needs 'messages', 'prompt' or 'input'.")


def estimate_request(
    body: Any,
    *,
    fallback_encoding: str = "cl100k_base",
    allow_download: bool = False,
) -> Estimate:
    """Estimate an OpenAI-style request body (already parsed from JSON)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest(f"'model' must be a string, got {model!r}.")
    prompt = prompt_tokens(body, model, fallback=fallback_encoding, download=allow_download)
    output = positive_int_or_none(body, "max_completion_tokens")
    max_tokens = positive_int_or_none(body, "max_tokens")
    return Estimate(model, prompt, output or max_tokens)
