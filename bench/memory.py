"""Memory: Redis bytes per active user after a realistic hour of traffic.

The hour: ``REQUESTS`` requests of about ``TOKENS`` tokens, evenly spread over 3,600 s, each
reserved then settled with a slightly different actual figure.

- ``quotas``: the store's clock override (``now_ms``) replays the hour in a second; the figure
  is ``MEMORY USAGE`` summed over every key of the user (``store.keys(scope)``). Settled
  records wait in the user's ledger outbox until a flush writes their rows; the replay drops
  them every 10 requests, as the worker does every ``LEDGER_BATCH_SECONDS``. Measured
  with tokens only, and with a requests-per-minute and a concurrency limit too (a second hash).
- ``limits`` cannot be given a clock: its moving window holds one list entry per unit of cost,
  so the figure is taken after the same hits within one window; the counter is two integers.
- DRF's throttle pickles a list of timestamps (one per request) into one cache key; its clock
  (``timer``) is replaced to spread the requests over the hour.

Run alone: ``python bench/memory.py``.
"""

from __future__ import annotations

import random
import time
import uuid
from types import SimpleNamespace
from typing import Any

import common
from common import Row

REQUESTS = 1_000
TOKENS = 500
HOUR_MS = 3_600_000
TARGET_BYTES = 1_024


def key_bytes(pattern: str) -> int:
    """``MEMORY USAGE`` (every element sampled) summed over this run's keys matching."""
    client = common.redis_client()
    keys = list(client.scan_iter(match=pattern, count=1000))
    return sum(client.memory_usage(key, samples=0) or 0 for key in keys)


def quotas_bytes(label: str, **plan_fields: Any) -> int:
    """Replay an hour on one user's window through the store; bytes of all the user's keys."""
    from quotas import services

    user = common.make_user(label, 1_000_000, **plan_fields)
    store, scope = services.get_store(), str(user.pk)
    limits = services.limits_for(user)
    rng = random.Random(6)
    start_ms = int(time.time() * 1000)
    epoch = uuid.uuid4().hex[:8]
    for index in range(REQUESTS):
        now_ms = start_ms + index * HOUR_MS // REQUESTS
        rid = f"{scope}/{uuid.uuid4().hex}"
        tokens = rng.randint(TOKENS - 100, TOKENS + 100)
        first = {"limits": limits, "epoch": epoch} if index == 0 else {}
        result = store.reserve(scope, rid, tokens, ttl_ms=600_000, now_ms=now_ms, **first)
        assert result.allowed, result
        store.settle(scope, rid, tokens - rng.randint(0, 50), epoch=epoch, now_ms=now_ms + 1500)
        if index % 10 == 9:  # the ledger sweep empties the outbox every few seconds
            store.ack_outbox(scope, [e.reservation_id for e in store.outbox(scope, batch=100)])
    return store.memory_usage(scope)


def limits_bytes(strategy: str) -> int:
    """Bytes after ``REQUESTS`` hits of ``TOKENS`` cost within one window."""
    from limits import RateLimitItemPerHour, strategies
    from limits.storage import RedisStorage

    prefix = f"{common.PREFIX}:limits-mem"
    storage = RedisStorage(common.redis_url(), key_prefix=prefix)
    limiter = getattr(strategies, strategy)(storage)
    item = RateLimitItemPerHour(REQUESTS * TOKENS * 2)
    for _ in range(REQUESTS):
        assert limiter.hit(item, strategy, cost=TOKENS)
    size = key_bytes(f"{prefix}:*{strategy}*")
    client = storage.get_connection()
    for key in client.scan_iter(match=f"{prefix}:*{strategy}*"):
        client.unlink(key)  # megabytes: do not leave them to the end of the run
    return size


def drf_bytes() -> int:
    """Bytes of DRF's history key after ``REQUESTS`` requests spread over the hour."""
    from django.core.cache import caches
    from django.test import RequestFactory
    from rest_framework.throttling import UserRateThrottle

    clock = {"now": time.time()}

    class HourThrottle(UserRateThrottle):
        rate = "1000000/hour"
        cache = caches["default"]
        timer = staticmethod(lambda: clock["now"])

    request = RequestFactory().post("/")
    request.user = SimpleNamespace(pk=f"{common.PREFIX}-mem", is_authenticated=True)
    for _ in range(REQUESTS):
        assert HourThrottle().allow_request(request, None)
        clock["now"] += HOUR_MS / 1000 / REQUESTS
    return key_bytes(f"{common.PREFIX}:*throttle_user_{common.PREFIX}-mem")


def run() -> list[Row]:
    """Measure every store; return the summary rows."""
    figures = {
        "quotas (tokens only)": quotas_bytes("mem"),
        "quotas (tokens + requests/minute + concurrency)": quotas_bytes(
            "mem-rpm", requests_per_minute=1_000, max_concurrent_requests=8
        ),
        "limits MovingWindow (one entry per token)": limits_bytes("MovingWindowRateLimiter"),
        "limits SlidingWindowCounter (approximate)": limits_bytes(
            "SlidingWindowCounterRateLimiter"
        ),
        "DRF UserRateThrottle (requests only)": drf_bytes(),
    }
    base = figures["quotas (tokens only)"]
    section = (
        f"Memory per user after an hour ({REQUESTS} requests of ~{TOKENS} tokens; "
        "ratio to quotas tokens only)"
    )
    rows = []
    for name, size in figures.items():
        ours = name.startswith("quotas")
        rows.append(
            Row(
                section,
                name,
                f"{size:,} bytes",
                f"{size / base:,.1f}x",
                f"<= {TARGET_BYTES} bytes" if ours else "",
                common.verdict(size <= TARGET_BYTES) if ours else "",
            )
        )
    return rows


if __name__ == "__main__":
    common.main(run)
