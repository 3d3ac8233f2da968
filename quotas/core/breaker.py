"""A circuit breaker for the quota store. Framework-free; the clock is injectable.

closed -> (``failures`` consecutive errors, or ``trip``) -> open -> (``reset_after``
seconds) -> half-open: one caller probes; success closes it, failure opens it again. While
open, callers skip Redis at once instead of waiting for a socket timeout on every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Counts consecutive failures; thread-safe; one instance per process and store."""

    def __init__(
        self,
        failures: int = 3,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.failures = failures
        self.reset_after = reset_after
        self.clock = clock
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to the store now (a half-open breaker lets one probe in)."""
        with self._lock:
            if self.state is BreakerState.CLOSED:
                return True
            waited = self.clock() - self._opened_at
            if waited < self.reset_after:
                return False
            # Half-open for that long: the probe never reported (it raised something other
            # than a store error); let another caller probe rather than stay shut for good.
            self._opened_at = self.clock()
            if self.state is BreakerState.OPEN:
                self._move(BreakerState.HALF_OPEN)
            return True

    def retry_after(self) -> float:
        """Seconds until the next probe is allowed (0 when closed)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(self.reset_after - (self.clock() - self._opened_at), 0.0)

    def record_success(self) -> None:
        with self._lock:
            self._count = 0
            if self.state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._count += 1
            if self.state is BreakerState.HALF_OPEN or self._count >= self.failures:
                self._opened_at = self.clock()
                if self.state is not BreakerState.OPEN:
                    self._move(BreakerState.OPEN)

    def trip(self) -> None:
        """Open now, whatever the count: the store cannot be reached at all (connection refused,
        reset or timed out), so the next callers must not each pay for finding that out."""
        with self._lock:
            self._count = max(self._count, self.failures)
            self._opened_at = self.clock()
            if self.state is not BreakerState.OPEN:
                self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        if self.on_change:
            self.on_change(old, new)
