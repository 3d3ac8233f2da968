"""A deterministic stand-in for an LLM: every request gets the same answer.

The natural answer is ``settings.GATEWAY["FAKE_ANSWER_TOKENS"]`` tokens of lorem-like English,
cut at the request's ``max_completion_tokens`` / ``max_tokens`` (then ``finish_reason`` is
``"length"``). Its ``usage`` is true: the prompt is counted exactly as the quota estimator counts
it (the same function: messages, tools, images and every other billed field), and the
completion is the number of tokens of the text actually returned. So a request that
names ``max_tokens`` larger than the answer is refunded the difference when it settles.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from quotas.core.chat import count_prompt_tokens
from quotas.core.encodings import count_text_tokens, encoding_for_model, get_encoding

__all__ = ["FakeAnswer", "answer", "natural_text"]

# Common English words, each a single token (with its leading space) in the tiktoken encodings,
# so a cut at any token boundary re-encodes to exactly the same number of tokens.
_VOCABULARY = (
    "the of and to in is that for it as with was on be by at this from or an are but not have "
    "all can more one will up out about time so what when there which their if do would each "
    "other how some these many then them way could people first water been call who its now "
    "find long down day did get come made may part over new sound take only little work know "
    "place year live back give most very after thing our just name good sentence man think say "
    "great where help through much before line right too mean old any same tell boy follow came "
    "want show also around form three small set put end does another well large must big even "
    "such because turn here why ask went men read need land different home us move try kind hand"
)
_WORDS = tuple(_VOCABULARY.split())
_SEED = 1729  # any constant: the answer must be the same in every process and on every run


def natural_text(words: int) -> str:
    """``words`` words of deterministic lorem-like English (the same first words for any length)."""
    rng = random.Random(_SEED)
    sentences: list[str] = []
    produced = 0
    while produced < words:
        length = min(rng.randint(6, 16), words - produced)
        chosen = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join([chosen[0].capitalize(), *chosen[1:]]) + ".")
        produced += length
    return " ".join(sentences)


@lru_cache(maxsize=32)
def _answer_tokens(encoding_name: str, tokens: int) -> tuple[int, ...]:
    encoding = get_encoding(encoding_name)
    # Words cost one or two tokens with the punctuation; as many words as tokens always suffice.
    encoded = encoding.encode(natural_text(tokens + 10), disallowed_special=())
    return tuple(encoded[:tokens])


@dataclass(frozen=True)
class FakeAnswer:
    """One answer of the fake model, with its true token counts."""

    model: str
    text: str
    pieces: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` block."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def answer(
    model: str,
    request: Mapping[str, Any],
    *,
    natural_tokens: int,
    max_tokens: int | None,
    tokens_per_piece: int = 4,
    prompt_tokens: int | None = None,
) -> FakeAnswer:
    """The fake model's answer to a chat ``request`` body (its prompt is counted as the quota
    estimator counts it): ``natural_tokens`` tokens, or ``max_tokens``
    when that is smaller (``finish_reason == "length"``). ``pieces`` are the streamed deltas,
    ``tokens_per_piece`` tokens each; joined they are ``text``. ``prompt_tokens``: the quota
    estimator's count of this request, when it already made one (the same figure, without
    counting the body twice)."""
    encoding = encoding_for_model(model)
    cut = max_tokens is not None and max_tokens < natural_tokens
    tokens = _answer_tokens(encoding.name, max_tokens if cut else natural_tokens)
    # The text is ASCII, so decoding slices of tokens never splits a character.
    pieces = tuple(
        encoding.decode(list(tokens[start : start + tokens_per_piece]))
        for start in range(0, len(tokens), tokens_per_piece)
    )
    text = "".join(pieces)
    return FakeAnswer(
        model=model,
        text=text,
        pieces=pieces,
        prompt_tokens=count_prompt_tokens(encoding, request)
        if prompt_tokens is None
        else prompt_tokens,
        completion_tokens=count_text_tokens(encoding, text),
        finish_reason="length" if cut else "stop",
    )
