"""Overshoot under concurrency: how much of one user's budget concurrent callers get through.

N processes (2, 4, 8), each with a few threads, start together and hammer one budget with
three times as many attempts as it holds. Admitted / budget must never exceed 1.0: a limiter
that reads the count, decides in Python and writes it back (DRF's throttle) lets concurrent
callers through on the same stale count.

Budgets: ``quotas`` and ``limits`` get ``BUDGET_REQUESTS * COST`` tokens and each attempt
costs ``COST`` tokens; DRF counts requests, so its budget is ``BUDGET_REQUESTS`` requests.
``quotas`` is measured at every layer: one user's own budget, a team's pooled budget four
users share, and a global budget on a model the same four users call.

Run alone: ``python bench/overshoot.py``.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import common
from common import Row

LEVELS = (2, 4, 8)
THREADS = 4
BUDGET_REQUESTS = 300
COST = 100
ATTEMPTS_FACTOR = 3

Attempt = Callable[[], bool]
# Built in the parent, called in each child to make that child's attempt function.
AttemptFactory = Callable[[], Attempt]


def quotas_factory(level: int) -> AttemptFactory:
    from quotas import services
    from quotas.exceptions import QuotaExceeded

    user = common.make_user(f"over-{level}", BUDGET_REQUESTS * COST)
    services.reserve(user, 0)  # loads the limits once, so the children hit Redis only

    def factory() -> Attempt:
        def attempt() -> bool:
            try:
                services.reserve(user, COST)
            except QuotaExceeded:
                return False
            return True

        return attempt

    return factory


def layered_factory(layer: str, level: int) -> AttemptFactory:
    """Four users, each with a budget of its own far out of reach, against one shared
    budget: a team's pooled hour (``layer`` "team") or a global limit on a model ("global")."""
    from quotas import services
    from quotas.exceptions import QuotaExceeded
    from quotas.models import GlobalLimit, Team, UserQuota

    label, budget = f"over-{layer}-{level}", BUDGET_REQUESTS * COST
    users = [common.make_user(f"{label}-{i}", 10**12) for i in range(4)]
    model = f"{common.PREFIX}-{label}"
    if layer == "team":
        pool = common.make_user(f"{label}-pool", budget).token_quota.plan
        team = Team.objects.create(name=model, slug=model, plan=pool)
        UserQuota.objects.filter(user__in=users).update(team=team)
    else:
        GlobalLimit.objects.create(
            name=model, metric="tokens", window_seconds=3600, model=model, budget=budget
        )
    services.config_changed()

    def factory() -> Attempt:
        turn = iter(range(10**9))

        def attempt() -> bool:
            try:
                services.reserve(users[next(turn) % len(users)], COST, model=model)
            except QuotaExceeded:
                return False
            return True

        return attempt

    return factory


def drf_factory(level: int) -> AttemptFactory:
    from django.core.cache import caches
    from django.test import RequestFactory
    from rest_framework.throttling import UserRateThrottle

    class BudgetThrottle(UserRateThrottle):
        rate = f"{BUDGET_REQUESTS}/hour"
        cache = caches["default"]

    request = RequestFactory().post("/")
    request.user = SimpleNamespace(pk=f"{common.PREFIX}-over-{level}", is_authenticated=True)

    def factory() -> Attempt:
        # A new throttle per request, as DRF's APIView does.
        return lambda: BudgetThrottle().allow_request(request, None)

    return factory


def limits_factory(strategy: str, level: int) -> AttemptFactory:
    def factory() -> Attempt:
        from limits import RateLimitItemPerHour, strategies
        from limits.storage import RedisStorage

        storage = RedisStorage(common.redis_url(), key_prefix=f"{common.PREFIX}:limits")
        limiter = getattr(strategies, strategy)(storage)
        item = RateLimitItemPerHour(BUDGET_REQUESTS * COST)
        return lambda: limiter.hit(item, f"over-{strategy}-{level}", cost=COST)

    return factory


LIMITERS: dict[str, Callable[[int], AttemptFactory]] = {
    "quotas services.reserve": quotas_factory,
    "quotas, a team's pooled budget (4 users)": lambda level: layered_factory("team", level),
    "quotas, a global per-model budget (4 users)": lambda level: layered_factory("global", level),
    "DRF UserRateThrottle (requests)": drf_factory,
    "limits MovingWindow (cost)": lambda level: limits_factory("MovingWindowRateLimiter", level),
    "limits SlidingWindowCounter (cost)": lambda level: limits_factory(
        "SlidingWindowCounterRateLimiter", level
    ),
}


def child(factory: AttemptFactory, attempts: int, barrier: Any, results: Any) -> None:
    """One process: ``THREADS`` threads calling the attempt; reports how many got through."""
    common.reset_quota_runtime()  # fresh Redis connections in this process
    attempt = factory()
    admitted = [0] * THREADS

    def worker(index: int) -> None:
        for _ in range(attempts):
            admitted[index] += bool(attempt())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    barrier.wait()  # every process starts hammering at the same moment
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(admitted))


def hammer(factory: AttemptFactory, processes: int) -> int:
    """Run ``processes`` children against one budget; the number of admitted requests."""
    from django.db import connections

    context = multiprocessing.get_context("fork")
    attempts = math.ceil(ATTEMPTS_FACTOR * BUDGET_REQUESTS / (processes * THREADS))
    barrier, results = context.Barrier(processes), context.Queue()
    connections.close_all()  # a forked child must not share the parent's database socket
    children = [
        context.Process(target=child, args=(factory, attempts, barrier, results))
        for _ in range(processes)
    ]
    for process in children:
        process.start()
    admitted = sum(results.get(timeout=120) for _ in children)
    for process in children:
        process.join()
    return admitted


def run() -> list[Row]:
    """Hammer each limiter at each concurrency; return the summary rows."""
    section = (
        f"Overshoot: admitted / budget ({BUDGET_REQUESTS} requests of {COST} tokens; "
        f"{ATTEMPTS_FACTOR}x as many attempts; processes x {THREADS} threads)"
    )
    rows = []
    for name, make_factory in LIMITERS.items():
        for level in LEVELS:
            admitted = hammer(make_factory(level), level)
            label = f"{name}, {level} x {THREADS}"
            rows.append(common.budget_row(section, label, admitted, BUDGET_REQUESTS))
    return rows


if __name__ == "__main__":
    common.main(run)
