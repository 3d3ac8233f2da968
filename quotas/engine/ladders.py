"""A plan's degradation ladder: which rungs a call that may degrade (``degrade=True``) tries
after the requested model refuses, in order: cheaper models, the response cache, a
deferred job.

Read from the database only on the way down a ladder or to learn whether a plan caches
answers, and then kept per process for ``LADDER_CACHE_SECONDS`` (a plan edit reaches the
other processes within that time; this process drops it at once).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from quotas.engine.plans import User, limits_for
from quotas.models import Plan

__all__ = ["LADDER_CACHE_SECONDS", "Ladder", "forget_ladders", "ladder_for", "ladder_of_plan"]

LADDER_CACHE_SECONDS = 10.0

_cache: dict[str, tuple[float, Ladder]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Ladder:
    """The rungs below the requested model, as the plan ``plan_slug`` declares them."""

    plan_slug: str
    fallback_models: tuple[str, ...] = ()
    serve_from_cache: bool = False
    cache_hit_cost: float = 0.0
    defer_when_refused: bool = False

    @property
    def empty(self) -> bool:
        return not (self.fallback_models or self.serve_from_cache or self.defer_when_refused)


def ladder_of_plan(plan_slug: str) -> Ladder:
    """The ladder of the plan with this slug (an empty one when there is no such plan)."""
    now = time.monotonic()
    cached = _cache.get(plan_slug)
    if cached is not None and now - cached[0] < LADDER_CACHE_SECONDS:
        return cached[1]
    plan = Plan.objects.filter(slug=plan_slug).first() if plan_slug else None
    ladder = _ladder(plan) if plan is not None else Ladder(plan_slug)
    with _lock:
        _cache[plan_slug] = (now, ladder)
    return ladder


def ladder_for(user: User | None) -> Ladder:
    """The ladder of the plan that applies to ``user`` (``ConfigurationError`` when none),
    kept per process as a plan's is (a user moved to another plan gets its ladder within
    ``LADDER_CACHE_SECONDS``)."""
    key = f"user:{user.pk}" if user is not None and user.is_authenticated else ""
    cached = _cache.get(key) if key else None
    if cached is not None and time.monotonic() - cached[0] < LADDER_CACHE_SECONDS:
        return cached[1]
    ladder = ladder_of_plan(limits_for(user).plan_slug)
    if key:
        with _lock:
            _cache[key] = (time.monotonic(), ladder)
    return ladder


def forget_ladders() -> None:
    """Drop this process's ladders (a plan changed)."""
    with _lock:
        _cache.clear()


def _ladder(plan: Plan) -> Ladder:
    models = plan.fallback_models if isinstance(plan.fallback_models, list) else []
    return Ladder(
        plan_slug=plan.slug,
        fallback_models=tuple(str(m) for m in models),
        serve_from_cache=plan.serve_from_cache,
        cache_hit_cost=float(plan.cache_hit_cost or 0),
        defer_when_refused=plan.defer_when_refused,
    )


@receiver([post_save, post_delete], sender=Plan, dispatch_uid="quotas_plan_ladder_changed")
def _plan_changed(sender: Any, **kwargs: Any) -> None:
    forget_ladders()
