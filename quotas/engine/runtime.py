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

from quotas.backends.redis import RedisWindowStore
from quotas.conf import quota_settings
from quotas.core.breaker import BreakerState, CircuitBreaker
from quotas.core.types import WindowSpec
from quotas.exceptions import StoreUnavailable
from quotas.telemetry import record_breaker

__all__ = [
    "broker_breaker",
    "broker_state",
    "get_breaker",
    "get_store",
    "guarded",
    "note_broker_seen",
    "now_ms",
    "per_process",
    "redis_key_prefix",
    "reservation_ttl_ms",
    "reset_runtime",
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
    """The process's ``RedisWindowStore`` on the configured django-redis alias."""
    store = _runtime.get("store")
    if store is None:
        client = get_redis_connection(quota_settings.CACHE_ALIAS)
        store = RedisWindowStore(client, prefix=redis_key_prefix(), spec=window_spec())
        _runtime["store"] = store
    return store


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


def get_breaker() -> CircuitBreaker:
    """The process's circuit breaker in front of Redis."""
    breaker = _runtime.get("breaker")
    if breaker is None:
        breaker = _runtime["breaker"] = CircuitBreaker(
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


def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the store through the breaker; an open breaker fails at once."""
    breaker = get_breaker()
    if not breaker.allow():
        raise StoreUnavailable("Redis circuit breaker is open.")
    try:
        result = fn(*args, **kwargs)
    except StoreUnavailable:
        breaker.record_failure()
        raise
    breaker.record_success()
    return result


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
