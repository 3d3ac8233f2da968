"""Every limit that applies to a quota key, read from the database once per config version.

A ``QuotaConfig`` holds the plan's own limits (tokens per window, requests per minute, the
per-request cap, concurrency), the plan's extra limits, the team's (its members' usage
pooled), the global ones, and the price table. Each process keeps the configs it has read in
memory, tagged with the *config version* (a Redis key): the reserve script checks the tag,
so an edit anywhere (a plan, a limit, a team, a membership, a global limit, a price) bumps
the version and every process drops its configs on its next decision, with no database
query in steady state and no scan of Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import F
from django.utils import timezone

from quotas.conf import quota_settings
from quotas.core.limits import Limit, Metric, Scope, Window
from quotas.core.pricing import Price, PriceTable
from quotas.core.types import Limits
from quotas.engine.runtime import get_store, guarded, per_process, window_spec
from quotas.exceptions import ConfigurationError, StoreUnavailable
from quotas.models import ConfigRevision, GlobalLimit, ModelPrice, Plan, Team, UserQuota

__all__ = [
    "ConfigCache",
    "QuotaConfig",
    "TeamRef",
    "config_changed",
    "configs",
    "load_config",
    "publish_config_changes",
    "time_zone",
]

logger = logging.getLogger("quotas")

# Configs one process keeps (the least recently used are dropped first).
CACHE_SIZE = 20_000
# A version never written by Redis: a config tagged with it is always refused as stale.
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class TeamRef:
    """The team a user's requests also count against."""

    id: int
    slug: str
    name: str

    @property
    def tag(self) -> str:
        """The hash tag of the team's counters."""
        return f"t:{self.id}"


@dataclass(frozen=True)
class QuotaConfig:
    """The limits of one quota key, read at config ``version``. ``limits`` are the plan's
    own figures (the primary token budget and what ``GET /quotas/me/`` shows); ``layers``
    every limit, the plan's own two first; ``caps`` the per-request caps (the user's plan's,
    the team's plan's) with their origin."""

    limits: Limits
    layers: tuple[Limit, ...]
    team: TeamRef | None = None
    caps: tuple[tuple[int, str], ...] = ()
    prices: PriceTable = field(default_factory=PriceTable, compare=False)
    # The config version this was read at: the reserve script refuses it once stale.
    version: str = UNKNOWN_VERSION
    _applicable: dict[str, tuple[Limit, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # The counters of each (quota key, limits): see ``quotas.engine.counters.charges_for``.
    charges: dict[tuple[str, tuple[Limit, ...]], Any] = field(
        default_factory=dict, compare=False, repr=False
    )

    def applicable(self, model: str) -> tuple[Limit, ...]:
        """The limits a request for ``model`` is decided against (their globs match it)."""
        found = self._applicable.get(model)
        if found is None:
            found = tuple(limit for limit in self.layers if limit.applies_to(model))
            if len(self._applicable) < 256:  # model names come from clients: bounded
                self._applicable[model] = found
        return found

    def user_layers(self) -> tuple[Limit, ...]:
        return tuple(limit for limit in self.layers if limit.scope is Scope.USER)


class ConfigCache:
    """This process's configs by quota key, tagged with the config version they were read
    at. A stale version (the reserve script says so) empties it."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.version = ""
        self._configs: OrderedDict[str, QuotaConfig] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, scope: str) -> QuotaConfig | None:
        with self._lock:
            config = self._configs.get(scope)
            if config is not None:
                self._configs.move_to_end(scope)
            return config

    def put(self, scope: str, config: QuotaConfig) -> None:
        with self._lock:
            self._configs[scope] = config
            if len(self._configs) > self._size:
                self._configs.popitem(last=False)

    def stale(self, version: str) -> None:
        """Redis's version is ``version``: forget every config read at another."""
        with self._lock:
            if version != self.version:
                self._configs.clear()
                self.version = version

    def current_version(self) -> str:
        """The version to tag new configs with, read from Redis once per process (before any
        config is read, so a config can never be newer than its tag)."""
        if not self.version:
            try:
                self.version = guarded(get_store().current_version)
            except StoreUnavailable:
                return UNKNOWN_VERSION
        return self.version


def configs() -> ConfigCache:
    """This process's config cache."""
    return per_process("configs", ConfigCache)


def time_zone() -> str:
    """The time zone of calendar limits: ``QUOTAS["TIME_ZONE"]``, else Django's."""
    return str(quota_settings.TIME_ZONE or getattr(settings, "TIME_ZONE", None) or "UTC")


def load_config(plan: Plan, override: int | None, team: Team | None) -> QuotaConfig:
    """The config of a user on ``plan`` (with a token budget ``override``) in ``team``."""
    zone = time_zone()
    team_plan = team.plan if team and team.is_active and team.plan else None
    team_ref = TeamRef(team.pk, team.slug, team.name) if team_plan and team else None
    layers = [
        *_plan_layers(plan, Scope.USER, override, zone),
        *(_plan_layers(team_plan, Scope.TEAM, None, zone) if team_plan else ()),
        *_global_layers(zone),
    ]
    caps = [(cap, f"plan:{p.slug}") for p in (plan, team_plan) if p and (cap := _cap(p))]
    return QuotaConfig(
        limits=_primary_limits(plan, override),
        layers=tuple(layers),
        team=team_ref,
        caps=tuple(caps),
        prices=price_table(),
    )


def _primary_limits(plan: Plan, override: int | None) -> Limits:
    return Limits(
        tokens_per_window=override or plan.tokens_per_hour,
        plan_slug=plan.slug,
        plan_name=plan.name,
        max_tokens_per_request=plan.max_tokens_per_request,
        requests_per_minute=plan.requests_per_minute,
        max_concurrent_requests=plan.max_concurrent_requests,
        default_output_tokens=plan.default_output_tokens,
    )


def _plan_layers(plan: Plan, scope: Scope, override: int | None, zone: str) -> list[Limit]:
    """A plan's hourly budget, requests per minute and extra limits, for ``scope``."""
    spec = window_spec()
    origin = f"plan:{plan.slug}" if scope is Scope.USER else f"team-plan:{plan.slug}"
    hour = Window.sliding(spec.window_seconds, spec.bucket_ms / 1000)
    budget = override or plan.tokens_per_hour
    own = "w" if scope is Scope.USER else ""
    layers = [Limit(scope, Metric.TOKENS, budget, hour, "", origin, counter=own)]
    if plan.requests_per_minute:
        minute = Window.sliding(60, spec.rpm_bucket_ms / 1000)
        requests = plan.requests_per_minute
        own = "q" if scope is Scope.USER else ""
        layers.append(Limit(scope, Metric.REQUESTS, requests, minute, "", origin, counter=own))
    layers += [extra.as_limit(scope, origin, zone) for extra in plan.limits.all()]
    return layers


def _global_layers(zone: str) -> list[Limit]:
    return [
        limit.as_limit(Scope.GLOBAL, f"global:{limit.name}", zone)
        for limit in GlobalLimit.objects.filter(is_active=True)
    ]


def _cap(plan: Plan) -> int | None:
    return plan.max_tokens_per_request


def price_table() -> PriceTable:
    """Every listed price (read with the configs, so a price edit bumps the version too)."""
    rows = ModelPrice.objects.values_list("model", "input_per_million", "output_per_million")
    return PriceTable(Price(model, given, taken) for model, given, taken in rows)


def user_config(user_id: int) -> QuotaConfig:
    """A user's config from the database: their plan (or the default plan), override, team.

    Raises ``ConfigurationError`` when no plan applies (never a silent "unlimited")."""
    quota = UserQuota.objects.select_related("plan", "team__plan").filter(user_id=user_id).first()
    plan = quota.plan if quota and quota.plan and quota.plan.is_active else None
    plan = plan or Plan.objects.filter(is_default=True, is_active=True).first()
    if plan is None:
        raise ConfigurationError(
            f"User {user_id} has no plan and no default plan is set: mark one active plan "
            "as the default, or give the user a plan."
        )
    override = quota.tokens_per_hour_override if quota else None
    return load_config(plan, override, quota.team if quota else None)


def anonymous_config() -> QuotaConfig:
    """The config of anonymous clients (``QUOTAS["ANONYMOUS_PLAN"]``)."""
    slug = quota_settings.ANONYMOUS_PLAN
    plan = Plan.objects.filter(slug=slug, is_active=True).first() if slug else None
    if plan is None:
        raise ConfigurationError(f"QUOTAS['ANONYMOUS_PLAN'] names no active plan ({slug!r}).")
    return load_config(plan, None, None)


# -- invalidation ----------------------------------------------------------------------------
_pending_bump = threading.Event()
_bump_lock = threading.Lock()
_pending_revision: list[int | None] = [None]  # the revision the retry thread publishes


def config_changed() -> None:
    """A plan, limit, team, membership, global limit or price changed: count it in the
    database (``ConfigRevision``), then bump the version so every process reloads. If Redis
    cannot take it now, a background thread retries until it can; and should this process
    be gone first, the next ledger sweep once Redis is back sees the database's revision
    ahead of the one Redis last published and bumps it (``publish_config_changes``)."""
    revision = _count_revision()
    try:
        guarded(get_store().bump_version, revision)
    except StoreUnavailable:
        logger.warning("quotas: Redis unavailable; the limits change will apply when it is back")
        _retry_bump_later(revision)
    else:
        _pending_bump.clear()
    configs().stale("")  # this process reloads at once in any case


def publish_config_changes() -> bool:
    """Bump the config version if the database counts a limits change Redis was not told
    of (saved while Redis was unreachable by a process that did not live to retry, or Redis
    restarted empty); whether it did. Run by ``flush_ledger``: one primary-key read and one
    Redis ``GET`` a sweep."""
    revision = ConfigRevision.objects.filter(pk=1).values_list("revision", flat=True).first()
    if not revision:
        return False
    store = get_store()
    if guarded(store.published_revision) >= revision:
        return False
    guarded(store.bump_version, revision)
    configs().stale("")
    logger.info("quotas: limits revision %d published; every process reloads its limits", revision)
    return True


def _count_revision() -> int | None:
    """One more limits change in the database; the new revision (``None``: the database
    refused, and only this process's retry can publish the change)."""
    now = timezone.now()
    bump = {"revision": F("revision") + 1, "changed_at": now}
    try:
        with transaction.atomic():
            if not ConfigRevision.objects.filter(pk=1).update(**bump):
                ConfigRevision.objects.get_or_create(pk=1)
                ConfigRevision.objects.filter(pk=1).update(**bump)
            revision: int = ConfigRevision.objects.values_list("revision", flat=True).get(pk=1)
            return revision
    except DatabaseError:
        logger.exception("quotas: could not count the limits change in the database")
        return None


def _retry_bump_later(revision: int | None) -> None:
    with _bump_lock:
        _pending_revision[0] = revision
        if _pending_bump.is_set():
            return
        _pending_bump.set()
    threading.Thread(target=_bump_until_done, name="quotas-config-bump", daemon=True).start()


def _bump_until_done(interval: float = 2.0, give_up_after: float = 24 * 3600) -> None:
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        time.sleep(interval)
        if not _pending_bump.is_set():  # a later change's bump got through meanwhile
            return
        with _bump_lock:
            revision = _pending_revision[0]
        try:
            get_store().bump_version(revision)
        except StoreUnavailable:
            continue
        _pending_bump.clear()
        logger.info("quotas: Redis is back; the limits change now applies in every process")
