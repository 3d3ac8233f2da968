"""The ``QUOTAS`` settings object.

All configuration lives in one dict setting, ``settings.QUOTAS``. Values are read at call time
through ``quota_settings`` (never at import or class-definition time), so ``override_settings``
works, and the cache of merged values is dropped whenever Django signals a settings change.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

__all__ = ["DEFAULTS", "QuotaSettings", "quota_settings"]

DEFAULTS: dict[str, Any] = {
    # django-redis cache alias whose connection holds the windows.
    "CACHE_ALIAS": "default",
    # Prefix of every Redis key the app writes.
    "KEY_PREFIX": "quotas",
    # Length of the token window and its bucket resolution, in seconds.
    "WINDOW_SECONDS": 3600,
    "BUCKET_SECONDS": 60,
    # Requests-per-minute limits use their own 60 s window at this resolution.
    "RPM_BUCKET_SECONDS": 1,
    # A reservation never settled is charged at its estimate after this many seconds.
    "RESERVATION_TTL_SECONDS": 600,
    # "open": serve while Redis is down (usage still recorded); "closed": answer 503.
    "FAILURE_POLICY": "open",
    # Circuit breaker: open after this many consecutive Redis failures, probe again after
    # BREAKER_RESET_SECONDS.
    "BREAKER_FAILURES": 3,
    "BREAKER_RESET_SECONDS": 5.0,
    # Callable (dotted path) turning a request into a token estimate.
    "ESTIMATOR": "quotas.core.estimate.estimate_request",
    # Encoding used for models tiktoken does not know, or whose encoding is not available
    # offline.
    "FALLBACK_ENCODING": "cl100k_base",
    # Let tiktoken download encodings that are not available locally (off: never reach the
    # network from a request).
    "ALLOW_ENCODING_DOWNLOAD": False,
    # Response header families: "seed" (X-RateLimit-*), "openai" (x-ratelimit-*-tokens),
    # "ietf" (RateLimit-Policy / RateLimit).
    "HEADERS": ("seed", "openai", "ietf"),
    # Plan slug applied to anonymous requests, keyed by client address; None: answer 401.
    "ANONYMOUS_PLAN": None,
    # How many trusted proxies stand in front (as DRF's NUM_PROXIES): anonymous clients are
    # keyed by the address the outermost one saw (X-Forwarded-For); None or 0: REMOTE_ADDR.
    "NUM_PROXIES": None,
    # Share of the budget at which ``budget_threshold_crossed`` fires once per window.
    "ALERT_THRESHOLD": 0.8,
    # Largest request body the estimator reads, in bytes.
    "MAX_BODY_BYTES": 1_000_000,
    # Requests a known client may have refused with 400 or 413 in the last minute; past that
    # every request of it is a 429 until the count falls (0: no such limit). See attempts.py.
    "REJECTED_PER_MINUTE": 30,
    # Ledger records are sent to the Celery worker in batches: one task per process every
    # this many seconds (0: one task per request, after the transaction commits) ...
    "LEDGER_BATCH_SECONDS": 0.05,
    # ... or as soon as this many records are waiting.
    "LEDGER_BATCH_SIZE": 200,
    # QuotaMiddleware settles in the request (0), or hands its settles to a per-process batch
    # sent every this many seconds, one Redis round trip per batch (see the README).
    "SETTLE_BATCH_SECONDS": 0,
    # A ledger record waiting longer than this in Redis (no Celery worker or beat writes the
    # ledger) makes GET /quotas/health/ "degraded" and each process log a warning ...
    "LEDGER_BACKLOG_WARN_SECONDS": 60,
    # ... checked by a background thread this often, so at most once per this many seconds
    # per process (0: no check, no warning).
    "LEDGER_BACKLOG_CHECK_SECONDS": 60,
    # Time zone of calendar limits (a day, a month): None uses settings.TIME_ZONE.
    "TIME_ZONE": None,
}


class QuotaSettings:
    """Attribute access to ``settings.QUOTAS`` merged over ``DEFAULTS``."""

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        self._defaults = defaults or DEFAULTS
        self._cached: dict[str, Any] | None = None

    @property
    def user_settings(self) -> dict[str, Any]:
        return dict(getattr(settings, "QUOTAS", None) or {})

    def as_dict(self) -> dict[str, Any]:
        if self._cached is None:
            self._cached = {**self._defaults, **self.user_settings}
        return self._cached

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._defaults:
            raise AttributeError(f"Invalid QUOTAS setting: {name!r}")
        return self.as_dict()[name]

    def reload(self) -> None:
        self._cached = None


quota_settings = QuotaSettings()


@receiver(setting_changed)
def _reload_quota_settings(*, setting: str, **kwargs: Any) -> None:
    # The engine drops what it derived from the settings through a receiver of its own.
    if setting == "QUOTAS":
        quota_settings.reload()
