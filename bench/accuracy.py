"""Accuracy of the window: the most admitted within any true window of the configured length.

A short window in real time (``WINDOW`` seconds; ``quotas`` buckets of ``BUCKET`` seconds) and
traffic timed to catch approximations out:

1. an anchor request at ``T0`` (``limits`` starts its fixed and counter windows at the first hit);
2. at ``Tb = T0 + WINDOW - 0.1 s``, 50 ms before a bucket and epoch-aligned window boundary, a
   burst of the whole budget;
3. then one request every ``TICK`` seconds (twice the budget's rate) for two more windows.

Every admitted request's time and cost is recorded; the figure is the most admitted within
any interval of ``WINDOW`` seconds, divided by the budget. A true sliding window scores 1.0;
a fixed window or a two-counter approximation lets a second budget through right after the
boundary (up to 2.0). ``quotas`` counts in buckets, so the same figure is also given over
``WINDOW - BUCKET`` seconds: the interval within which its buckets guarantee the budget.

Run alone: ``python bench/accuracy.py``.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable
from types import SimpleNamespace

import common
from common import Row

WINDOW = 4.0
BUCKET = 0.25
BUDGET = 4_000  # tokens per window
COST = 40  # tokens per request; DRF counts requests, so its budget is BUDGET // COST requests
TICK = 0.005
HAMMER_WINDOWS = 2.25

# A limiter's attempt returns the admission time (epoch seconds) or None when refused.
Attempt = Callable[[], float | None]


def timed(fn: Callable[[], bool]) -> Attempt:
    """Admission time of a client-side limiter: the middle of the call."""

    def attempt() -> float | None:
        start = time.time()
        ok = fn()
        return (start + time.time()) / 2 if ok else None

    return attempt


def quotas_attempt() -> Attempt:
    from quotas import services
    from quotas.exceptions import QuotaExceeded

    user = common.make_user("accuracy", BUDGET)

    def attempt() -> float | None:
        try:
            reservation = services.reserve(user, COST)
        except QuotaExceeded:
            return None
        return reservation.reserved_at_ms / 1000  # the Redis clock the decision used

    return attempt


def limits_attempts() -> dict[str, Attempt]:
    from limits import RateLimitItemPerSecond, strategies
    from limits.storage import RedisStorage

    storage = RedisStorage(common.redis_url(), key_prefix=f"{common.PREFIX}:limits")
    item = RateLimitItemPerSecond(BUDGET, int(WINDOW))
    out = {}
    for label, strategy in (
        ("limits MovingWindow", strategies.MovingWindowRateLimiter),
        ("limits SlidingWindowCounter", strategies.SlidingWindowCounterRateLimiter),
        ("limits FixedWindow", strategies.FixedWindowRateLimiter),
    ):
        limiter = strategy(storage)
        out[label] = timed(lambda limiter=limiter, label=label: limiter.hit(item, label, cost=COST))
    return out


def drf_attempt() -> Attempt:
    from django.core.cache import caches
    from django.test import RequestFactory
    from rest_framework.throttling import UserRateThrottle

    class WindowThrottle(UserRateThrottle):
        rate = f"{BUDGET // COST}/{int(WINDOW)}s"
        cache = caches["default"]

        def parse_rate(self, rate: str) -> tuple[int, int]:
            # DRF reads only the first letter of the period, so "100/4s" means per second.
            return BUDGET // COST, int(WINDOW)

    request = RequestFactory().post("/")
    request.user = SimpleNamespace(pk=f"{common.PREFIX}-acc", is_authenticated=True)

    def attempt() -> float | None:
        throttle = WindowThrottle()
        return throttle.now if throttle.allow_request(request, None) else None  # DRF's clock

    return attempt


def sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def drive(attempts: dict[str, Attempt]) -> dict[str, list[float]]:
    """Send the anchor, the burst and the steady stream; admission times per limiter."""
    admitted: dict[str, list[float]] = {name: [] for name in attempts}

    def send() -> None:
        for name, attempt in attempts.items():
            moment = attempt()
            if moment is not None:
                admitted[name].append(moment)

    # Tb: 50 ms before a boundary that is a multiple of the window (so of every bucket too).
    burst_at = math.ceil((time.time() + WINDOW + 0.5) / WINDOW) * WINDOW - 0.05
    sleep_until(burst_at - WINDOW + 0.1)
    send()  # the anchor: limits' fixed and counter windows start here, and end after the burst
    sleep_until(burst_at)
    for _ in range(BUDGET // COST):
        send()
    stop, tick = burst_at + HAMMER_WINDOWS * WINDOW, time.time()
    while tick < stop:
        tick += TICK
        sleep_until(tick)
        send()
    return admitted


def most_in_window(times: list[float], length: float) -> int:
    """The most admissions within any half-open interval of ``length`` seconds."""
    times = sorted(times)
    return max(
        (bisect_left(times, start + length) - index for index, start in enumerate(times)),
        default=0,
    )


def run() -> list[Row]:
    """Drive every limiter with the same traffic; return the summary rows."""
    from django.conf import settings
    from django.test.utils import override_settings

    quotas = {**settings.QUOTAS, "WINDOW_SECONDS": WINDOW, "BUCKET_SECONDS": BUCKET}
    with override_settings(QUOTAS=quotas):
        common.reset_quota_runtime()
        try:
            attempts: dict[str, Attempt] = {"quotas services.reserve": quotas_attempt()}
            attempts.update(limits_attempts())
            attempts["DRF UserRateThrottle"] = drf_attempt()
            admitted = drive(attempts)
        finally:
            common.reset_quota_runtime()
    return rows(admitted)


def rows(admitted: dict[str, list[float]]) -> list[Row]:
    section = (
        f"Accuracy: most admitted in any {WINDOW:g} s window / budget ({BUDGET} tokens; "
        f"quotas buckets {BUCKET:g} s; burst then {COST}-token requests at 2x the budget rate)"
    )
    out = []
    for name, times in admitted.items():
        most = most_in_window(times, WINDOW) * COST
        out.append(common.budget_row(section, name, most, BUDGET, " tokens"))
    return out


if __name__ == "__main__":
    common.main(run)
