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
    # A Redis Cluster to keep the windows on instead of the cache alias's Redis, e.g.
    # "redis://10.0.0.1:7000/?socket_timeout=0.5" (any node; the others are discovered).
    "REDIS_CLUSTER_URL": None,
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
    # Fail-open is bounded: while its breaker is open, each process admits at most this share
    # of every limit's budget per window, counted locally (from 0 excluded to 1). With N
    # processes an outage overshoots a budget by at most N * DEGRADED_SHARE * budget.
    "DEGRADED_SHARE": 1.0,
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
    # this many seconds (0: one task per request, after the transaction commits); a record
    # made while Redis was unreachable (no outbox copy) is sent at once ...
    "LEDGER_BATCH_SECONDS": 0.5,
    # ... or as soon as this many records are waiting.
    "LEDGER_BATCH_SIZE": 200,
    # QuotaMiddleware settles in the request (0), or hands its settles to a per-process batch
    # sent every this many seconds, one Redis round trip per batch (see the README).
    "SETTLE_BATCH_SECONDS": 0,
    # With SETTLE_BATCH_SECONDS 0: True makes QuotaMiddleware settle a response that is not a
    # stream under WSGI once it has been sent (Django closes it), so the client never waits
    # for the settle's round trip; False (the default): before it is sent. A reservation
    # holding a concurrent-request slot always settles before (the client's next request
    # must find the slot free).
    "SETTLE_AFTER_RESPONSE": False,
    # A ledger record waiting longer than this in Redis (no Celery worker or beat writes the
    # ledger) makes GET /quotas/health/ "degraded" and each process log a warning ...
    "LEDGER_BACKLOG_WARN_SECONDS": 60,
    # ... checked by a background thread this often, so at most once per this many seconds
    # per process (0: no check, no warning).
    "LEDGER_BACKLOG_CHECK_SECONDS": 60,
    # Ledger rows (UsageRecord) older than this many days are deleted by the beat task
    # quotas.tasks.prune_ledger (hourly rollups are kept); None: keep the ledger forever.
    "LEDGER_RETENTION_DAYS": None,
    # Time zone of calendar limits (a day, a month): None uses settings.TIME_ZONE.
    "TIME_ZONE": None,
    # -- The provider side (quotas.llm) -------------------------------------------------------
    # One logical LLM call (its retries and waits for the provider included) never takes
    # longer than this ...
    "LLM_DEADLINE_SECONDS": 60.0,
    # ... and one attempt's HTTP timeout is at most this (and never past the deadline).
    "LLM_ATTEMPT_TIMEOUT_SECONDS": 30.0,
    # Retries: exponential backoff with full jitter, the first wait up to this many seconds,
    # doubling, each wait at most LLM_RETRY_MAX_SECONDS (a provider's retry-after can be
    # longer: it is honoured), at most LLM_MAX_ATTEMPTS attempts.
    "LLM_RETRY_BASE_SECONDS": 0.5,
    "LLM_RETRY_MAX_SECONDS": 20.0,
    "LLM_MAX_ATTEMPTS": 6,
    # A call that may degrade waits at most this long for the provider (its learned limits,
    # the adaptive rate) before the next rung of the plan's ladder serves it.
    "LLM_DEGRADE_AFTER_SECONDS": 1.0,
    # Exact-match response cache (a degradation rung): how long an answer is kept.
    "LLM_CACHE_SECONDS": 3600,
    # Dotted path of a callable ``(provider: str) -> openai.OpenAI`` that deferred jobs run
    # with in the Celery worker (the caller's client cannot travel with the job).
    "LLM_CLIENT_FACTORY": "quotas.llm.clients.default_client",
    # Circuit breaker per provider and model, shared by every process through Redis.
    "PROVIDER_BREAKER_FAILURES": 3,
    "PROVIDER_BREAKER_RESET_SECONDS": 10.0,
    # Adaptive rate: a provider 429 cuts the allowed call rate to this share of the rate
    # that met it; each success adds PROVIDER_RATE_RECOVERY of that rate back, until the
    # limit is lifted. Never below PROVIDER_MIN_RATE calls per second.
    "PROVIDER_RATE_DECREASE": 0.5,
    "PROVIDER_RATE_RECOVERY": 0.05,
    "PROVIDER_MIN_RATE": 0.2,
    # A provider 429 without retry-after holds every process back this long.
    "PROVIDER_BACKOFF_SECONDS": 1.0,
    # A deferred job not run within this many seconds expires.
    "DEFERRED_JOB_TTL_SECONDS": 86400,
    # -- Seeing what happens (quotas.api.metrics, quotas.alerts) ------------------------------
    # Who may read the Prometheus metrics besides staff users: a bearer token ...
    "METRICS_TOKEN": None,
    # ... or a client address in these addresses or networks (e.g. ("10.0.0.0/8",)).
    "METRICS_ALLOWED_IPS": (),
    # Budget alert rules: see the README ("Budget alerts") and quotas.core.alerts.
    "ALERTS": [],
    # One webhook delivery attempt waits at most this long for the receiver.
    "ALERT_WEBHOOK_TIMEOUT_SECONDS": 5.0,
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
        # Only reached for a name not set on the instance yet: the first read of each
        # setting (after which it is an instance attribute: the request path reads settings
        # a dozen times per request), or an invalid name.
        if name.startswith("_") or name not in self._defaults:
            raise AttributeError(f"Invalid QUOTAS setting: {name!r}")
        value = self.as_dict()[name]
        self.__dict__[name] = value
        return value

    def reload(self) -> None:
        for name in self._defaults:
            self.__dict__.pop(name, None)
        self._cached = None


quota_settings = QuotaSettings()


@receiver(setting_changed)
def _reload_quota_settings(*, setting: str, **kwargs: Any) -> None:
    # The engine drops what it derived from the settings through a receiver of its own.
    if setting == "QUOTAS":
        quota_settings.reload()
