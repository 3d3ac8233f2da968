"""Token estimates of OpenAI-style requests, made before the LLM call. Framework-free.

An estimate is the prompt counted with tiktoken (every field the provider bills, see
``quotas.core.chat``) plus the output allowance: the request's ``max_completion_tokens`` /
``max_tokens``, or (``output_tokens=None``) the plan's default. Bodies that break the bounds
of ``quotas.core.bounds`` (nesting, message counts, model names, token figures) are refused
with ``InvalidRequest`` before anything is counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quotas.core.bounds import InvalidRequest, check_depth, check_model_name, check_token_figure
from quotas.core.chat import count_prompt_tokens, messages_of
from quotas.core.encodings import encoding_for_model

__all__ = ["Estimate", "InvalidRequest", "estimate_request", "positive_int_or_none"]


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
    """``body[field]`` as a positive integer up to ``MAX_TOKENS``, ``None`` when absent (or
    null); anything else is invalid."""
    value = body.get(field)
    return None if value is None else check_token_figure(value, field)


def prompt_tokens(body: Mapping[str, Any], model: str, *, fallback: str, download: bool) -> int:
    """Prompt tokens of a chat (``messages``), completion (``prompt``) or ``input`` body."""
    encoding = encoding_for_model(model, fallback=fallback, allow_download=download)
    return count_prompt_tokens(encoding, body)


def estimate_request(
    body: Any,
    *,
    fallback_encoding: str = "cl100k_base",
    allow_download: bool = False,
) -> Estimate:
    """Estimate an OpenAI-style request body (already parsed from JSON)."""
    # Depth first, whatever the body is: the JSON parser's own recursion limit depends on the
    # Python version (3.11 refuses 1,000 levels, 3.12 parses them), so the limit is ours.
    check_depth(body)
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object.")
    model = check_model_name(body.get("model", ""))
    # Cheap checks first: a refused body costs no counting.
    output = positive_int_or_none(body, "max_completion_tokens")
    max_tokens = positive_int_or_none(body, "max_tokens")
    if "messages" in body:
        messages_of(body)  # the message count, before a walk over every message
    prompt = prompt_tokens(body, model, fallback=fallback_encoding, download=allow_download)
    return Estimate(model, prompt, output or max_tokens)
