"""What a provider's response says about its own limits: the ``x-ratelimit-*`` headers
(OpenAI's names), ``retry-after-ms`` and ``retry-after``. Framework-free; the clock of an
HTTP-date ``retry-after`` is injectable.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = ["ProviderHeaders", "parse_duration_ms", "parse_provider_headers", "retry_after_ms"]

# OpenAI's durations: "1s", "6m0s", "1h2m3.5s", "20ms"; a bare number is seconds.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_MS_PER_UNIT = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# A provider hint longer than a day is a broken header, not a plan to wait.
MAX_HINT_MS = 86_400_000


@dataclass(frozen=True)
class ProviderHeaders:
    """The provider's figures from one response (``None``: the header was absent or broken).

    ``*_reset_ms`` is how long until that budget is full again, as the provider said it;
    ``retry_after_ms`` is its own advice on when to call again (on 429s and 503s).
    """

    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset_ms: int | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset_ms: int | None = None
    retry_after_ms: int | None = None

    def figures(self) -> list[int]:
        """The figures in the provider scripts' order, ``-1`` for an absent one."""
        values = (
            self.requests_limit,
            self.requests_remaining,
            self.requests_reset_ms,
            self.tokens_limit,
            self.tokens_remaining,
            self.tokens_reset_ms,
            self.retry_after_ms,
        )
        return [-1 if value is None else value for value in values]


def parse_duration_ms(text: str | None) -> int | None:
    """Milliseconds of an OpenAI-style duration (``"6m0s"``, ``"20ms"``, ``"1.5"``), rounded
    up; ``None`` when it is not one."""
    if text is None:
        return None
    text = text.strip().lower()
    try:
        return _bounded(float(text) * 1000)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return _bounded(sum(float(n) * _MS_PER_UNIT[u] for n, u in parts))


def retry_after_ms(
    headers: Mapping[str, str], clock: Callable[[], float] = time.time
) -> int | None:
    """The provider's retry advice in ms: ``retry-after-ms`` first (OpenAI's, precise), else
    ``retry-after`` in seconds or as an HTTP date; ``None`` when it gave none."""
    precise = _int_of(headers.get("retry-after-ms"))
    if precise is not None:
        return precise
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_duration_ms(value)
    if seconds is not None:
        return seconds
    try:
        moment = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return _bounded((moment - clock()) * 1000)


def parse_provider_headers(
    headers: Mapping[str, str], clock: Callable[[], float] = time.time
) -> ProviderHeaders:
    """Every figure a response's headers give (keys in lower case)."""
    return ProviderHeaders(
        requests_limit=_int_of(headers.get("x-ratelimit-limit-requests")),
        requests_remaining=_int_of(headers.get("x-ratelimit-remaining-requests")),
        requests_reset_ms=parse_duration_ms(headers.get("x-ratelimit-reset-requests")),
        tokens_limit=_int_of(headers.get("x-ratelimit-limit-tokens")),
        tokens_remaining=_int_of(headers.get("x-ratelimit-remaining-tokens")),
        tokens_reset_ms=parse_duration_ms(headers.get("x-ratelimit-reset-tokens")),
        retry_after_ms=retry_after_ms(headers, clock),
    )


def _int_of(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return _bounded(value) if value == value else None  # NaN is no figure


def _bounded(value: float) -> int | None:
    """A figure as whole milliseconds (or units), rounded up; negative or absurd: ``None``."""
    if not 0 <= value <= 1e15:
        return None
    return min(int(-(-value // 1)), 10**15)
