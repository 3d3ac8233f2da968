"""Prompt tokens of an OpenAI-style request, counting everything the provider bills.
Framework-free.

The estimate decides admission, so nothing a provider reads may escape it: what can be
counted is counted, what cannot is refused (``InvalidRequest``, a 400 that says so).

- A chat costs 3 tokens of reply priming, and every message 3 tokens of framing plus its
  fields (OpenAI's published recipe): ``role`` and other string fields their tokens, ``name``
  one token more.
- ``content``: a string, its tokens; a list of parts: a string or a ``text`` part's ``text``
  and a ``refusal`` part's ``refusal``, their tokens; an ``image_url`` part, OpenAI's tile
  rule (``quotas.core.images``); ``input_audio`` and ``file`` parts are refused (their cost
  is unknown before the call); any other part, or a part's other keys, the tokens of its
  compact JSON text.
- Every other message field that is not a string (``tool_calls``, ``function_call``,
  ``audio``, an unknown key holding a list or an object): the tokens of its compact JSON text.
- The request's ``tools``, ``functions``, ``tool_choice``, ``response_format`` and
  ``prediction``: the tokens of their compact JSON text. OpenAI renders tool definitions in a
  shorter form than JSON, so this counts a little more than it bills, never less.
- ``prompt`` and ``input`` bodies: the tokens of each string.

Every text goes through ``count_text_tokens`` (linear time, see there), a repeated string is
counted once per request, and the limits of ``quotas.core.bounds`` hold, so any body up to the
body-size limit is estimated in a fraction of a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import tiktoken

from quotas.core.bounds import MAX_CONTENT_PARTS, MAX_MESSAGES, InvalidRequest
from quotas.core.encodings import count_text_tokens
from quotas.core.images import DETAILS, image_size, image_tokens

__all__ = ["BILLED_FIELDS", "count_chat_tokens", "count_prompt_tokens", "messages_of"]

# Per OpenAI's published counting recipe for chat models: every message costs 3 tokens of
# framing, a "name" costs 1 more, and every reply is primed with 3 tokens.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# Request fields (besides the messages) whose content the model reads.
BILLED_FIELDS = ("tools", "functions", "tool_choice", "response_format", "prediction")
UNESTIMABLE_PARTS = ("input_audio", "file")


class _Counter:
    """Counts texts for one request; a string seen before costs a dictionary look-up."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.seen: dict[str, int] = {}
        self.parts = 0

    def text(self, text: str) -> int:
        tokens = self.seen.get(text)
        if tokens is None:
            tokens = self.seen[text] = count_text_tokens(self.encoding, text)
        return tokens

    def value(self, value: Any) -> int:
        """A string's tokens; anything else, its compact JSON text's; ``None``: nothing."""
        if value is None:
            return 0
        if isinstance(value, str):
            return self.text(value)
        return self.text(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def messages_of(body: Mapping[str, Any]) -> list[Any]:
    """``body["messages"]``, checked to be a non-empty list of at most ``MAX_MESSAGES``."""
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of message objects.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(
            f"'messages' may hold at most {MAX_MESSAGES} messages, got {len(messages)}.",
            "messages",
        )
    return messages


def count_chat_tokens(encoding: tiktoken.Encoding, messages: Iterable[Any]) -> int:
    """Prompt tokens of a list of chat messages, framing included (see the module docstring)."""
    return _count_messages(_Counter(encoding), messages)


def count_prompt_tokens(encoding: tiktoken.Encoding, body: Mapping[str, Any]) -> int:
    """Prompt tokens of a whole request body: its messages (or ``prompt`` / ``input``) and
    every other field the model reads (``BILLED_FIELDS``)."""
    counter = _Counter(encoding)
    if "messages" in body:
        total = _count_messages(counter, messages_of(body))
    else:
        total = _count_texts(counter, body)
    return total + sum(counter.value(body.get(field)) for field in BILLED_FIELDS)


def _count_texts(counter: _Counter, body: Mapping[str, Any]) -> int:
    for field in ("prompt", "input"):
        if field in body:
            value = body[field]
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest(f"'{field}' must be a string or a list of strings.", field)
            if len(texts) > MAX_MESSAGES:
                raise InvalidRequest(
                    f"'{field}' may hold at most {MAX_MESSAGES} items, got {len(texts)}.", field
                )
            return sum(counter.text(text) for text in texts)
    raise InvalidRequest("The body needs 'messages', 'prompt' or 'input'.")


def _count_messages(counter: _Counter, messages: Iterable[Any]) -> int:
    total = REPLY_PRIMING_TOKENS
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"'messages[{index}]' must be an object.", f"messages[{index}]")
        total += TOKENS_PER_MESSAGE + _message_tokens(counter, message, f"messages[{index}]")
    return total


def _message_tokens(counter: _Counter, message: Mapping[str, Any], where: str) -> int:
    total = 0
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(counter, value, f"{where}.content")
        else:
            total += counter.value(value)
            if key == "name" and isinstance(value, str):
                total += TOKENS_PER_NAME
    return total


def _content_tokens(counter: _Counter, content: Any, where: str) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return counter.text(content)
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content parts.", where)
    counter.parts += len(content)
    if counter.parts > MAX_CONTENT_PARTS:
        raise InvalidRequest(
            f"A request may hold at most {MAX_CONTENT_PARTS} content parts.", where
        )
    return sum(_part_tokens(counter, part, f"{where}[{i}]") for i, part in enumerate(content))


def _part_tokens(counter: _Counter, part: Any, where: str) -> int:
    if isinstance(part, str):
        return counter.text(part)
    if not isinstance(part, Mapping):
        raise InvalidRequest(f"'{where}' must be a content part object or a string.", where)
    kind = part.get("type")
    if kind in UNESTIMABLE_PARTS:
        raise InvalidRequest(
            f"'{where}' is an {kind!r} part: its cost cannot be estimated before the call, so "
            "this endpoint does not accept it.",
            f"{where}.type",
        )
    if kind == "image_url":
        return _image_tokens(counter, part.get("image_url"), f"{where}.image_url") + _rest(
            counter, part, ("type", "image_url")
        )
    field = {"text": "text", "refusal": "refusal"}.get(kind) if isinstance(kind, str) else None
    if field and isinstance(part.get(field), str):
        return counter.text(part[field]) + _rest(counter, part, ("type", field))
    return counter.value(part)


def _rest(counter: _Counter, part: Mapping[str, Any], known: tuple[str, ...]) -> int:
    """Tokens of a part's keys beyond the ones its type defines (usually none)."""
    rest = {key: value for key, value in part.items() if key not in known}
    return counter.value(rest) if rest else 0


def _image_tokens(counter: _Counter, image: Any, where: str) -> int:
    if isinstance(image, str):
        image = {"url": image}
    if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
        raise InvalidRequest(f"'{where}.url' must be a string (the image's URL).", f"{where}.url")
    detail = image.get("detail") or "auto"
    if not isinstance(detail, str) or detail not in DETAILS:
        raise InvalidRequest(
            f"'{where}.detail' must be 'auto', 'low' or 'high'.", f"{where}.detail"
        )
    size = None if detail == "low" else image_size(image["url"])
    # The URL is not text the model reads (a data URL is the image itself); other keys are.
    return image_tokens(detail, size) + _rest(counter, image, ("url", "detail"))
