"""Memory: Redis bytes per active user after a realistic hour of traffic.

The hour: ``REQUESTS`` requests of about ``TOKENS`` tokens, evenly spread over 3,600 s, each
reserved then settled with a slightly different actual figure.

- ``quotas``: the store's clock override (``now_ms``) replays the hour in a second; the figure
  is ``MEMORY USAGE`` summed over every key of the user (``store.keys(scope)``) and of its
  limits' counters. Settled
  records wait in the user's ledger outbox until a flush writes their rows; the replay drops
  them every 10 requests, as the worker does every ``LEDGER_BATCH_SECONDS``. Measured
  with tokens only, with a requests-per-minute and a concurrency limit too (a second hash),
  and with a minute + hour + day + month set of limits (four counters; target 2 KB).
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
# A minute + hour + day + month set: four counters, two kilobytes.
LAYERED_TARGET_BYTES = 2_048


def key_bytes(pattern: str) -> int:
    """``MEMORY USAGE`` (every element sampled) summed over this run's keys matching."""
    client = common.redis_client()
    keys = list(client.scan_iter(match=pattern, count=1000))
    return sum(client.memory_usage(key, samples=0) or 0 for key in keys)


def quotas_bytes(label: str, extra_limits: int = 0, **plan_fields: Any) -> int:
    """Replay an hour on one user's counters through the store; bytes of all the user's keys.
    ``extra_limits`` 3: a minute of tokens, a sliding day and a calendar month of cost on the
    plan, beside its hour (a minute + hour + day + month set)."""
    from quotas import services
    from quotas.engine.plans import config_for
    from quotas.engine.reservations import Request, ask_for
    from quotas.models import PlanLimit

    user = common.make_user(label, 1_000_000, **plan_fields)
    if extra_limits:
        plan = user.token_quota.plan
        big = 10**12
        PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=60, budget=big)
        PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=86_400, budget=big)
        PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=big)
        services.config_changed()
    store, scope = services.get_store(), str(user.pk)
    config = config_for(user)
    request = Request(user, None, scope, "", "", TOKENS, False, None)
    charges = ask_for(request, config).charges
    rng = random.Random(6)
    start_ms = int(time.time() * 1000)
    seeds = {i: (uuid.uuid4().hex[:8], []) for i, c in enumerate(charges.counters, 1) if c.seeded}
    for index in range(REQUESTS):
        now_ms = start_ms + index * HOUR_MS // REQUESTS
        rid = f"{scope}/{uuid.uuid4().hex}"
        tokens = rng.randint(TOKENS - 100, TOKENS + 100)
        amounts = [tokens if c.limit.metric == "tokens" else 1 for c in charges.counters]
        result = store.reserve(
            scope, rid, charges.counters, amounts, ttl_ms=600_000, now_ms=now_ms,
            primary=charges.primary, tokens=tokens, seeds=seeds if index == 0 else None,
            concurrency=config.limits.max_concurrent_requests or 0,
        )  # fmt: skip
        assert result.status == 1, result
        store.settle(
            scope, rid, charges.counters, actual_tokens=tokens - rng.randint(0, 50),
            epoch=result.epoch, primary=charges.primary, now_ms=now_ms + 1500,
        )  # fmt: skip
        if index % 10 == 9:  # the ledger sweep empties the outbox every few seconds
            store.ack_outbox(scope, [e.reservation_id for e in store.outbox(scope, batch=100)])
    return store.memory_usage(scope, charges.counters)


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
        "quotas (a minute + hour + day + month set of limits)": quotas_bytes(
            "mem-layers", extra_limits=3
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
        target = LAYERED_TARGET_BYTES if "month" in name else TARGET_BYTES
        rows.append(
            Row(
                section,
                name,
                f"{size:,} bytes",
                f"{size / base:,.1f}x",
                f"<= {target} bytes" if ours else "",
                common.verdict(size <= target) if ours else "",
            )
        )
    return rows


if __name__ == "__main__":
    common.main(run)
