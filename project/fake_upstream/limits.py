"""The fake upstream's own rate limits: fixed windows of requests and tokens per model, as a
provider enforces them, with the figures its ``x-ratelimit-*`` headers report."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Decision", "ModelLimits", "RateLimiter", "duration"]


@dataclass(frozen=True)
class ModelLimits:
    """Requests and tokens per window (0: no such limit)."""

    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class Decision:
    """One request's fate and the headers' figures after it."""

    allowed: bool
    kind: str  # what refused: "requests" or "tokens" ("" when allowed)
    limits: ModelLimits
    requests_left: int
    tokens_left: int
    reset_seconds: float


@dataclass
class _Window:
    index: int = -1
    requests: int = 0
    tokens: int = 0


@dataclass
class RateLimiter:
    """Fixed windows of ``window`` seconds since the server started, per model."""

    default: ModelLimits
    per_model: dict[str, ModelLimits] = field(default_factory=dict)
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._start = self.clock()

    def limits_of(self, model: str) -> ModelLimits:
        return self.per_model.get(model, self.default)

    def decide(self, model: str, tokens: int) -> Decision:
        """Charge one request of ``tokens`` if both limits allow, else nothing."""
        limits = self.limits_of(model)
        with self._lock:
            elapsed = self.clock() - self._start
            index = int(elapsed // self.window)
            w = self._windows.setdefault(model, _Window())
            if w.index != index:
                w.index, w.requests, w.tokens = index, 0, 0
            kind = ""
            if limits.rpm and w.requests + 1 > limits.rpm:
                kind = "requests"
            elif limits.tpm and w.tokens + tokens > limits.tpm:
                kind = "tokens"
            if not kind:
                w.requests, w.tokens = w.requests + 1, w.tokens + tokens
            reset = (index + 1) * self.window - elapsed
            return Decision(
                allowed=not kind,
                kind=kind,
                limits=limits,
                requests_left=max(limits.rpm - w.requests, 0),
                tokens_left=max(limits.tpm - w.tokens, 0),
                reset_seconds=reset,
            )

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()
            self._start = self.clock()


def duration(seconds: float) -> str:
    """OpenAI's duration style, never rounded down: ``250ms``, ``12.5s``, ``1m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60)
    secs = math.ceil(secs * 1000) / 1000
    return f"{int(minutes)}m{secs:g}s" if minutes else f"{secs:g}s"
