"""The bounds every request figure is held to before it reaches Redis or the ledger.
Framework-free.

A body is refused (``InvalidRequest``, a 400 naming the field) when it breaks one of these, so
no figure can overflow Redis's integers, no name can outgrow its ledger column, and no body
can cost more than linear time to estimate:

- ``MAX_TOKENS``: the largest token figure one request may name or report (``max_tokens``,
  a reservation, a settle's usage). No model reads or writes anywhere near a billion tokens in
  one call; the bound keeps every sum far inside the 53 bits Lua counts exactly.
- ``MAX_MODEL_LENGTH``: the longest model name (the ledger's ``UsageRecord.model`` column);
  model names may not hold control characters either.
- ``MAX_REQUEST_ID_LENGTH``: the longest reservation id, ``"<quota key>/<request id>"`` (the
  ledger's ``UsageRecord.request_id`` column); no control characters either.
- ``MAX_MESSAGES``: the most chat messages, or ``prompt`` / ``input`` items, in one body
  (2048 is OpenAI's limit on the items of one embeddings ``input``).
- ``MAX_CONTENT_PARTS``: the most content parts in one body, all messages together.
- ``MAX_JSON_DEPTH``: the deepest nesting of objects and lists in a body (a tool's JSON
  schema needs a dozen levels at most).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_CONTENT_PARTS",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGES",
    "MAX_MODEL_LENGTH",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_TOKENS",
    "InvalidRequest",
    "check_depth",
    "check_model_name",
    "check_reservation_id",
    "check_token_figure",
]

MAX_TOKENS = 1_000_000_000
MAX_MODEL_LENGTH = 200
MAX_REQUEST_ID_LENGTH = 200
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 10_000
MAX_JSON_DEPTH = 64

# C0 and C1 control characters (tabs and newlines included: no model name has one).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidRequest(ValueError):
    """The request body cannot be estimated. The message names the offending field, and
    ``param`` names it the way OpenAI's errors do (``messages[0].content``), when known.
    ``code`` is the ``error.code`` of the 400 that answers it."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


def check_model_name(model: Any, param: str = "model") -> str:
    """``model`` when it is a string the ledger can store; ``InvalidRequest`` otherwise."""
    if not isinstance(model, str):
        raise InvalidRequest(f"'{param}' must be a string, got {_short(model)}.", param)
    if len(model) > MAX_MODEL_LENGTH:
        raise InvalidRequest(
            f"'{param}' must be at most {MAX_MODEL_LENGTH} characters, got {len(model)}.", param
        )
    if _CONTROL.search(model):
        raise InvalidRequest(f"'{param}' must not contain control characters.", param)
    return model


def check_reservation_id(reservation_id: str) -> str:
    """``reservation_id`` when the ledger can store it; ``InvalidRequest`` otherwise."""
    if len(reservation_id) > MAX_REQUEST_ID_LENGTH or _CONTROL.search(reservation_id):
        raise InvalidRequest(
            f"The request id must make a reservation id ('<quota key>/<request id>') of at most "
            f"{MAX_REQUEST_ID_LENGTH} characters without control characters; got "
            f"{len(reservation_id)} characters.",
            "request_id",
        )
    return reservation_id


def check_token_figure(value: Any, param: str, *, minimum: int = 1) -> int:
    """``value`` when it is an integer from ``minimum`` to ``MAX_TOKENS``; else
    ``InvalidRequest`` naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        word = "positive" if minimum == 1 else "non-negative"
        raise InvalidRequest(f"'{param}' must be a {word} integer, got {_short(value)}.", param)
    if value > MAX_TOKENS:
        raise InvalidRequest(f"'{param}' must be at most {MAX_TOKENS}, got {value}.", param)
    return value


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """``InvalidRequest`` when objects and lists nest deeper than ``limit`` levels.

    Iterative (no recursion to overflow), one level at a time: linear in the number of
    objects and lists, about 0.2 µs each. A scalar nests nothing."""
    if type(value) not in _CONTAINERS:
        return
    level, depth = [value], 1
    while level:
        deeper: list[Any] = []
        for node in level:
            children = node.values() if type(node) is dict else node
            deeper.extend([child for child in children if type(child) in _CONTAINERS])
        if deeper and depth >= limit:
            raise InvalidRequest(
                f"The request body nests objects and lists more than {limit} levels deep."
            )
        level, depth = deeper, depth + 1


_CONTAINERS = (dict, list)


def _short(value: Any) -> str:
    """A value's repr, cut short: a message must never echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
