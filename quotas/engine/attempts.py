"""Rejected attempts: a per-client cost for requests refused with 400 or 413.

A known client (a user, or an anonymous client keyed by address under ``ANONYMOUS_PLAN``) whose
requests to quota-enforced endpoints were answered 400 or 413 ``QUOTAS["REJECTED_PER_MINUTE"]``
times within the last minute (a sliding window, like requests per minute) is answered 429
(``error.code`` ``rate_limit_exceeded``, ``error.type`` ``attempts``, ``Retry-After``) for
every request until its count falls under the allowance. ``0`` turns the limit off.

What it costs, by design:

- an admitted request pays nothing more: the reserve script reads the client's attempts
  window in the same round trip, and only while the user's primary counter says a rejected
  attempt may still count (its ``ab`` field, which ``attempt.lua`` keeps true);
- a rejected request pays one round trip to count it (``attempt.lua``); a 413 decided by the
  reserve script is counted by that same script;
- a client over its allowance is refused from memory in every process that has learned it
  (from the count's reply, or from a reserve the script refused): ``QuotaMiddleware`` refuses
  it by its credentials (the ``Authorization`` header) before the view authenticates, parses
  or estimates anything; the throttle refuses it by its quota key before reading the body.
  A process that has not learned it yet refuses it at its next reserve.
"""

from __future__ import annotations

import math
import time
from typing import Any

from quotas.conf import quota_settings
from quotas.engine.runtime import get_store, guarded, per_process
from quotas.exceptions import QuotaExceeded, StoreUnavailable
from quotas.telemetry import record_decision

__all__ = ["Blocklist", "block", "blocked_for", "record_rejected", "refusal"]

# The most clients one process remembers as refused (the oldest are forgotten first).
BLOCKLIST_SIZE = 10_000


class Blocklist:
    """Clients refused for too many rejected attempts, and until when (monotonic clock)."""

    def __init__(self, size: int = BLOCKLIST_SIZE, clock: Any = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._size = size
        self._clock = clock

    def block(self, keys: list[str], seconds: float) -> None:
        until = self._clock() + seconds
        for key in keys:
            self._until[key] = max(until, self._until.get(key, 0.0))
        if len(self._until) > self._size:
            self._prune()

    def blocked_for(self, keys: list[str]) -> float:
        """Seconds the first blocked key among ``keys`` stays refused (0: none is)."""
        for key in keys:
            until = self._until.get(key)
            if until is not None:
                left = until - self._clock()
                if left > 0:
                    return left
                self._until.pop(key, None)
        return 0.0

    def _prune(self) -> None:
        now = self._clock()
        live = sorted((until, key) for key, until in list(self._until.items()) if until > now)
        self._until = {key: until for until, key in live[-self._size // 2 :]}


def _blocklist() -> Blocklist:
    return per_process("blocklist", Blocklist)


def blocked_for(keys: list[str]) -> float:
    """Seconds this process still refuses the client known by ``keys`` (no I/O)."""
    if not keys or not quota_settings.REJECTED_PER_MINUTE:
        return 0.0
    return _blocklist().blocked_for(keys)


def block(keys: list[str], seconds: float) -> None:
    """Refuse the client known by ``keys`` in this process for ``seconds``."""
    if keys and seconds > 0:
        _blocklist().block(keys, seconds)


def record_rejected(scope: str, keys: list[str]) -> None:
    """Count one rejected attempt of the client with quota key ``scope``; when that takes it
    to its allowance, remember it as refused. Redis being down costs the client nothing."""
    limit = quota_settings.REJECTED_PER_MINUTE
    if not limit:
        return
    try:
        seconds = guarded(get_store().record_attempt, scope, int(limit))
    except StoreUnavailable:
        return
    block(keys, seconds)


def refusal(seconds: float) -> QuotaExceeded:
    """The 429 of a client over its rejected-attempts allowance."""
    limit = int(quota_settings.REJECTED_PER_MINUTE)
    record_decision("refused", "client:attempts:blocked", None)  # decided in memory
    return QuotaExceeded(
        limit=limit,
        remaining=0,
        requested=1,
        retry_after=max(seconds, 0.001),
        scope="attempts",
        reset_seconds=math.ceil(seconds),
    )
