"""Per-process runtime state: the store, its circuit breaker, the broker's breaker, and the
figures derived from the settings. Everything here is made on first use and forgotten when
``QUOTAS`` changes (``override_settings`` in tests, a settings reload)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils import timezone
from django_redis import get_redis_connection
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from quotas.backends.cluster import ClusterWindowStore
from quotas.backends.cluster_slots import CLUSTER_ERRORS
from quotas.backends.redis import RedisWindowStore
from quotas.conf import quota_settings
from quotas.core.breaker import BreakerState, CircuitBreaker
from quotas.core.degraded import LocalWindows
from quotas.core.types import WindowSpec
from quotas.exceptions import StoreUnavailable
from quotas.telemetry import record_breaker

__all__ = [
    "broker_breaker",
    "broker_state",
    "degraded_windows",
    "get_breaker",
    "get_store",
    "guarded",
    "guarded_for",
    "note_broker_seen",
    "now_ms",
    "per_process",
    "redis_key_prefix",
    "reservation_ttl_ms",
    "reset_runtime",
    "unreachable",
    "window_spec",
]

logger = logging.getLogger("quotas")
T = TypeVar("T")

_runtime: dict[str, Any] = {}


def reset_runtime() -> None:
    """Forget the per-process store, breakers and derived settings (settings changed)."""
    _runtime.clear()


def window_spec() -> WindowSpec:
    """The window geometry from the settings (derived once per process and settings change)."""
    spec = _runtime.get("spec")
    if spec is None:
        spec = _runtime["spec"] = WindowSpec.from_seconds(
            quota_settings.WINDOW_SECONDS,
            quota_settings.BUCKET_SECONDS,
            quota_settings.RPM_BUCKET_SECONDS,
        )
    return spec


def per_process(name: str, make: Callable[[], T]) -> T:
    """The process's ``name`` object, made by ``make`` on first use (until settings change)."""
    value = _runtime.get(name)
    if value is None:
        value = _runtime[name] = make()
    return value  # type: ignore[no-any-return]


@receiver(setting_changed, dispatch_uid="quotas_runtime_settings_changed")
def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("QUOTAS", "CACHES"):
        reset_runtime()


def reservation_ttl_ms() -> int:
    """``RESERVATION_TTL_SECONDS`` in milliseconds."""
    return per_process("ttl_ms", lambda: int(quota_settings.RESERVATION_TTL_SECONDS * 1000))


def now_ms() -> int:
    """This process's clock in ms since the Unix epoch (Redis's clock decides; this one only
    stamps what happens without Redis)."""
    return int(timezone.now().timestamp() * 1000)


def get_store() -> RedisWindowStore:
    """The process's ``RedisWindowStore``: on the configured django-redis alias, or on the
    Redis Cluster ``QUOTAS["REDIS_CLUSTER_URL"]`` names (a ``ClusterWindowStore``)."""
    store = _runtime.get("store")
    if store is None:
        cluster_url = quota_settings.REDIS_CLUSTER_URL
        if cluster_url:
            try:
                client = cluster_client(str(cluster_url))
            except CLUSTER_ERRORS as exc:  # no node answered: asked again on the next call
                raise StoreUnavailable(f"Redis Cluster unreachable: {exc}") from exc
            store = ClusterWindowStore(client, prefix=redis_key_prefix(), spec=window_spec())
        else:
            client = get_redis_connection(quota_settings.CACHE_ALIAS)
            store = RedisWindowStore(client, prefix=redis_key_prefix(), spec=window_spec())
        _runtime["store"] = store
    return store


# Cluster client defaults a URL's query can override (``?socket_timeout=2``): a request
# never waits long for a node that is down.
CLUSTER_CLIENT_DEFAULTS: dict[str, Any] = {
    "socket_connect_timeout": 0.5,
    "socket_timeout": 1.0,
}


def cluster_client(url: str) -> RedisCluster:
    """A ``redis.cluster.RedisCluster`` on the cluster ``url`` names (any of its nodes).

    A call that fails is tried once more, at once, after the client relearned which node
    serves its slot (a failover moved it): redis-py's default (ten tries with a growing
    pause) would hold a request for a second while a master is down, and the circuit
    breaker, not the client, decides what a request sees then."""
    retry = Retry(NoBackoff(), 1)
    return RedisCluster.from_url(url, retry=retry, **CLUSTER_CLIENT_DEFAULTS)


# What makes a cache alias namespace its keys (Django's cache settings).
CACHE_KEY_SETTINGS = ("KEY_PREFIX", "VERSION", "KEY_FUNCTION")


def redis_key_prefix() -> str:
    """The prefix of every Redis key of the app: ``QUOTAS["KEY_PREFIX"]``, namespaced the way
    the cache alias namespaces its own keys (its ``KEY_FUNCTION``; by default
    ``<KEY_PREFIX>:<VERSION>:<key>``, e.g. ``site-a:1:quotas``), so two sites sharing one
    Redis with different cache prefixes never share a budget. An alias that sets none of
    ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION`` keeps the bare ``QUOTAS["KEY_PREFIX"]``
    (the keys of earlier versions)."""
    alias = quota_settings.CACHE_ALIAS
    config = settings.CACHES.get(alias, {})
    if not any(name in config for name in CACHE_KEY_SETTINGS):
        return str(quota_settings.KEY_PREFIX)
    return str(caches[alias].make_key(quota_settings.KEY_PREFIX))


def get_breaker(node: str = "") -> CircuitBreaker:
    """The process's circuit breaker in front of Redis (on Redis Cluster, one per ``node``
    as ``RedisWindowStore.breaker_key`` names it: a failing node opens its own breaker)."""
    name = f"breaker:{node}" if node else "breaker"
    breaker = _runtime.get(name)
    if breaker is None:
        breaker = _runtime[name] = CircuitBreaker(
            failures=quota_settings.BREAKER_FAILURES,
            reset_after=quota_settings.BREAKER_RESET_SECONDS,
            on_change=_log_breaker_change,
        )
        record_breaker("redis", breaker.state, moved=False)
    return breaker


def _log_breaker_change(old: BreakerState, new: BreakerState) -> None:
    # One line per state change, not one per request.
    log = logger.info if new is BreakerState.CLOSED else logger.warning
    log("quotas: Redis circuit breaker %s -> %s", old.value, new.value)
    record_breaker("redis", new)
    if new is BreakerState.CLOSED:
        # Redis decides again: the counts of the degraded decisions (quotas.engine.degraded)
        # start from zero at the next outage.
        local = _runtime.get("degraded_windows")
        if local is not None:
            local.clear()


def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the store through the breaker; an open breaker fails at once."""
    return _through(get_breaker(), fn, *args, **kwargs)


def guarded_for(scope: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``guarded``, through the breaker of the Redis node that serves quota key ``scope``
    (the process's breaker while no store can be made: a cluster no node of which answers)."""
    try:
        node = get_store().breaker_key(scope)
    except StoreUnavailable:
        node = ""
    return _through(get_breaker(node), fn, *args, **kwargs)


def _through(breaker: CircuitBreaker, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if not breaker.allow():
        raise StoreUnavailable("Redis circuit breaker is open.")
    try:
        result = fn(*args, **kwargs)
    except StoreUnavailable as exc:
        if unreachable(exc):
            # Refused, reset, or no connection made in time: the first such error opens the
            # breaker, so the rest of this request (its settle) and the next ones skip Redis.
            breaker.trip()
        else:
            breaker.record_failure()
        raise
    breaker.record_success()
    return result


def unreachable(exc: StoreUnavailable) -> bool:
    """Whether Redis could not be reached at all. A reply that timed out is not that: the
    call may have run (a lost reply), and what follows it (the settle of a reservation
    whose reply was lost) must still reach Redis, so it counts as one failure of
    ``BREAKER_FAILURES``, as an error Redis answered with does."""
    cause = exc.__cause__
    if isinstance(cause, RedisTimeoutError | TimeoutError):
        return "connecting" in str(cause)  # redis-py: "Timeout connecting to server"
    return isinstance(cause, RedisConnectionError | OSError)


def degraded_windows() -> LocalWindows:
    """This process's counts of degraded decisions (``quotas.engine.degraded``), made once
    even when two threads meet the outage together (``setdefault`` is atomic)."""
    local = _runtime.get("degraded_windows")
    if local is None:
        local = _runtime.setdefault("degraded_windows", LocalWindows())
    return local  # type: ignore[no-any-return]


def broker_state() -> str:
    """What this process knows of the Celery broker from publishing ledger batches: ``"ok"``,
    ``"unavailable"`` (its breaker is open: rows are written directly) or ``"unknown"``."""
    if broker_breaker().state is not BreakerState.CLOSED:
        return "unavailable"
    return "ok" if _runtime.get("broker_seen") else "unknown"


def broker_breaker() -> CircuitBreaker:
    """The process's circuit breaker in front of the Celery broker (ledger batches)."""
    breaker = _runtime.get("broker_breaker")
    if breaker is None:
        breaker = _runtime["broker_breaker"] = CircuitBreaker(
            failures=1,
            reset_after=quota_settings.BREAKER_RESET_SECONDS,
            on_change=lambda old, new: record_breaker("broker", new),
        )
        record_breaker("broker", breaker.state, moved=False)
    return breaker


def note_broker_seen() -> None:
    """The broker took a ledger batch: ``broker_state`` says ``"ok"`` from now on."""
    _runtime["broker_seen"] = True
