"""System checks for misconfiguration, with stable ids.

quotas.E001  QUOTAS["CACHE_ALIAS"] names no cache in CACHES.
quotas.E002  That cache is not a django-redis cache (the windows need shared, atomic Redis).
quotas.E003  WINDOW_SECONDS / BUCKET_SECONDS / RPM_BUCKET_SECONDS are not a valid geometry.
quotas.E004  FAILURE_POLICY is neither "open" nor "closed".
quotas.E005  A numeric setting is out of range.
quotas.E006  Unknown keys in QUOTAS (likely a typo).
quotas.E007  QUOTAS["TIME_ZONE"] is not a time zone this machine knows (calendar limits).
quotas.E008  QUOTAS["LLM_CLIENT_FACTORY"] cannot be imported (deferred jobs could not run).
quotas.E009  QUOTAS["DEGRADED_SHARE"] is not a number above 0 and at most 1 (the share of each
             budget a process may admit while Redis is unreachable).
quotas.E010  QUOTAS["REDIS_CLUSTER_URL"] is not a redis:// or rediss:// URL.
quotas.E011  QUOTAS["METRICS_TOKEN"] or QUOTAS["METRICS_ALLOWED_IPS"] is not valid.
quotas.E012  QUOTAS["ALERTS"] is not a valid list of budget alert rules.
quotas.E013  QUOTAS["LEDGER_RETENTION_DAYS"] is neither None nor a positive integer.
quotas.W001  A view uses TokenQuotaThrottle but QuotaMiddleware is not installed, so
             reservations are never settled and are charged at their estimate.
quotas.W002  Cost limits exist but no model price is listed: every cost would be 0.
quotas.W003  Models used in the last 30 days have no listed price while cost limits exist:
             they are charged at the table's highest prices (never free). Database checks:
             run with ``manage.py check --database default``.
quotas.W004  The URLconf mounts ``quotas.api.metrics.MetricsView`` but prometheus_client is
             not installed: the view answers 503.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import DatabaseError
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from django.utils.module_loading import import_string

from quotas import telemetry
from quotas.api.metrics import MetricsView
from quotas.conf import DEFAULTS, quota_settings
from quotas.core.alerts import parse_rules
from quotas.core.globs import glob_matches
from quotas.core.types import WindowSpec
from quotas.models import GlobalLimit, ModelPrice, PlanLimit, UsageRecord
from quotas.throttling import TokenQuotaThrottle

E001_MSG = "QUOTAS['CACHE_ALIAS'] = {alias!r} is not a cache in CACHES."
E001_HINT = "Add a django-redis cache under that alias, or point CACHE_ALIAS at one."
E002_MSG = "The cache {alias!r} ({backend}) is not a django-redis cache."
E002_HINT = (
    "Quota windows must live in one Redis shared by every process; use "
    "'django_redis.cache.RedisCache'."
)
E003_HINT = "Use e.g. WINDOW_SECONDS=3600, BUCKET_SECONDS=60, RPM_BUCKET_SECONDS=1."
E004_MSG = "QUOTAS['FAILURE_POLICY'] must be 'open' or 'closed', not {value!r}."
E005_MSG = "QUOTAS[{key!r}] must be {rule}, not {value!r}."
E006_MSG = "Unknown QUOTAS settings: {keys}."
E006_HINT = "The known settings are listed in the README's settings reference."
E008_MSG = "QUOTAS['LLM_CLIENT_FACTORY'] = {path!r} cannot be imported: {error}."
E008_HINT = "Give the dotted path of a callable (provider name) -> openai.OpenAI."
E009_MSG = "QUOTAS['DEGRADED_SHARE'] must be a number above 0 and at most 1, not {value!r}."
E009_HINT = (
    "It is the share of each budget one process may admit while Redis is unreachable "
    "(1.0: the whole budget per process; e.g. 0.25 with four web processes keeps an outage "
    "within the budget)."
)
E010_MSG = "QUOTAS['REDIS_CLUSTER_URL'] = {value!r} is not a redis:// or rediss:// URL."
E010_HINT = "Name any node of the cluster, e.g. 'redis://10.0.0.1:7000/0', or leave it None."
E011_MSG = "QUOTAS[{key!r}] must be {rule}, not {value!r}."
E012_HINT = "See the README's 'Budget alerts' for the shape of a rule."
W004_MSG = "quotas.api.metrics.MetricsView is mounted but prometheus_client is not installed."
W004_HINT = 'pip install "django-llm-quotas[metrics]" (the view answers 503 without it).'
E013_MSG = "QUOTAS['LEDGER_RETENTION_DAYS'] must be None or a positive integer, not {value!r}."
E013_HINT = (
    "Give a number of days (at least the longest window or calendar period of any limit), "
    "or None to keep the ledger forever."
)
W001_MSG = "TokenQuotaThrottle is in use but quotas.middleware.QuotaMiddleware is not installed."
W001_HINT = (
    "Add 'quotas.middleware.QuotaMiddleware' to MIDDLEWARE so reservations are settled with "
    "the actual usage; without it every request is charged its full estimate when it expires."
)

E007_MSG = "QUOTAS['TIME_ZONE'] = {value!r} is not a time zone this machine knows."
E007_HINT = "Use an IANA name such as 'UTC' or 'Europe/Paris' (install tzdata if none work)."
W002_MSG = "Cost limits exist but no model price is listed: every request would cost 0."
W002_HINT = "Add model prices in the admin (quotas > model prices)."
W003_MSG = "These models have no listed price and are charged at the highest prices: {models}."
W003_HINT = "Add a price (or a glob such as 'gpt-4o*') for each in the admin."
UNPRICED_LOOKBACK = timedelta(days=30)

NUMERIC_RULES: dict[str, tuple[str, Any]] = {
    "RESERVATION_TTL_SECONDS": ("a positive number", lambda v: v > 0),
    "BREAKER_FAILURES": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "BREAKER_RESET_SECONDS": ("a positive number", lambda v: v > 0),
    "ALERT_THRESHOLD": ("a number between 0 and 1", lambda v: 0 <= v <= 1),
    "MAX_BODY_BYTES": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "LEDGER_BATCH_SECONDS": ("a number of seconds, 0 or more", lambda v: v >= 0),
    "LEDGER_BATCH_SIZE": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "SETTLE_BATCH_SECONDS": ("a number of seconds, 0 or more", lambda v: v >= 0),
    "REJECTED_PER_MINUTE": ("an integer, 0 or more", lambda v: isinstance(v, int) and v >= 0),
    "LEDGER_BACKLOG_WARN_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "LEDGER_BACKLOG_CHECK_SECONDS": ("a number of seconds, 0 or more", lambda v: v >= 0),
    "LLM_DEADLINE_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "LLM_ATTEMPT_TIMEOUT_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "LLM_RETRY_BASE_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "LLM_RETRY_MAX_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "LLM_MAX_ATTEMPTS": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "LLM_DEGRADE_AFTER_SECONDS": ("a number of seconds, 0 or more", lambda v: v >= 0),
    "LLM_CACHE_SECONDS": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "PROVIDER_BREAKER_FAILURES": ("a positive integer", lambda v: isinstance(v, int) and v > 0),
    "PROVIDER_BREAKER_RESET_SECONDS": ("a positive number", lambda v: v > 0),
    "PROVIDER_RATE_DECREASE": ("a number between 0 and 1 (excluded)", lambda v: 0 < v < 1),
    "PROVIDER_RATE_RECOVERY": ("a number between 0 and 1", lambda v: 0 < v <= 1),
    "PROVIDER_MIN_RATE": ("a positive number of calls per second", lambda v: v > 0),
    "PROVIDER_BACKOFF_SECONDS": ("a number of seconds, 0 or more", lambda v: v >= 0),
    "DEFERRED_JOB_TTL_SECONDS": ("a positive number of seconds", lambda v: v > 0),
    "ALERT_WEBHOOK_TIMEOUT_SECONDS": ("a positive number of seconds", lambda v: v > 0),
}


@register(Tags.caches, "quotas")
def check_cache(**kwargs: Any) -> list[CheckMessage]:
    alias = quota_settings.CACHE_ALIAS
    cache = settings.CACHES.get(alias)
    if cache is None:
        return [Error(E001_MSG.format(alias=alias), hint=E001_HINT, id="quotas.E001")]
    backend = cache.get("BACKEND", "")
    if not backend.startswith("django_redis."):
        msg = E002_MSG.format(alias=alias, backend=backend)
        return [Error(msg, hint=E002_HINT, id="quotas.E002")]
    return []


@register("quotas")
def check_settings(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    values = quota_settings.as_dict()
    try:
        WindowSpec.from_seconds(
            values["WINDOW_SECONDS"], values["BUCKET_SECONDS"], values["RPM_BUCKET_SECONDS"]
        )
    except (TypeError, ValueError) as exc:
        errors.append(Error(str(exc), hint=E003_HINT, id="quotas.E003"))
    if values["FAILURE_POLICY"] not in ("open", "closed"):
        msg = E004_MSG.format(value=values["FAILURE_POLICY"])
        errors.append(Error(msg, id="quotas.E004"))
    for key, (rule, ok) in NUMERIC_RULES.items():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            msg = E005_MSG.format(key=key, rule=rule, value=value)
            errors.append(Error(msg, id="quotas.E005"))
    proxies = values["NUM_PROXIES"]
    if proxies is not None and (
        isinstance(proxies, bool) or not isinstance(proxies, int) or proxies < 0
    ):
        msg = E005_MSG.format(
            key="NUM_PROXIES", rule="None or an integer, 0 or more", value=proxies
        )
        errors.append(Error(msg, id="quotas.E005"))
    after = values["SETTLE_AFTER_RESPONSE"]
    if not isinstance(after, bool):
        msg = E005_MSG.format(key="SETTLE_AFTER_RESPONSE", rule="True or False", value=after)
        errors.append(Error(msg, id="quotas.E005"))
    errors += _client_factory_errors(values["LLM_CLIENT_FACTORY"])
    errors += _degraded_share_errors(values["DEGRADED_SHARE"])
    cluster_url = values["REDIS_CLUSTER_URL"]
    if cluster_url is not None and not (
        isinstance(cluster_url, str) and cluster_url.startswith(("redis://", "rediss://"))
    ):
        msg = E010_MSG.format(value=cluster_url)
        errors.append(Error(msg, hint=E010_HINT, id="quotas.E010"))
    unknown = sorted(set(quota_settings.user_settings) - set(DEFAULTS))
    if unknown:
        msg = E006_MSG.format(keys=", ".join(unknown))
        errors.append(Error(msg, hint=E006_HINT, id="quotas.E006"))
    return errors


def _degraded_share_errors(share: Any) -> list[CheckMessage]:
    if not isinstance(share, bool) and isinstance(share, int | float) and 0 < share <= 1:
        return []
    return [Error(E009_MSG.format(value=share), hint=E009_HINT, id="quotas.E009")]


def _client_factory_errors(path: Any) -> list[CheckMessage]:
    try:
        factory = import_string(str(path))
    except ImportError as exc:
        return [Error(E008_MSG.format(path=path, error=exc), hint=E008_HINT, id="quotas.E008")]
    if not callable(factory):
        msg = E008_MSG.format(path=path, error="it is not callable")
        return [Error(msg, hint=E008_HINT, id="quotas.E008")]
    return []


@register("quotas")
def check_retention(**kwargs: Any) -> list[CheckMessage]:
    days = quota_settings.LEDGER_RETENTION_DAYS
    if days is None or (isinstance(days, int) and not isinstance(days, bool) and days > 0):
        return []
    return [Error(E013_MSG.format(value=days), hint=E013_HINT, id="quotas.E013")]


@register("quotas")
def check_time_zone(**kwargs: Any) -> list[CheckMessage]:
    zone = quota_settings.TIME_ZONE
    if zone is None:
        return []
    try:
        ZoneInfo(str(zone))
    except (ValueError, KeyError, OSError):
        return [Error(E007_MSG.format(value=zone), hint=E007_HINT, id="quotas.E007")]
    return []


@register("quotas", Tags.database)
def check_prices(databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Cost limits need prices; models without one are listed (database checks only)."""
    if not databases:
        return []
    try:
        return _price_warnings()
    except DatabaseError:  # not migrated yet (``migrate`` runs the database checks first)
        return []


def _price_warnings() -> list[CheckMessage]:
    cost = {"metric": "cost"}
    if not (
        PlanLimit.objects.filter(**cost).exists() or GlobalLimit.objects.filter(**cost).exists()
    ):
        return []
    globs = list(ModelPrice.objects.values_list("model", flat=True))
    if not globs:
        return [Warning(W002_MSG, hint=W002_HINT, id="quotas.W002")]
    since = timezone.now() - UNPRICED_LOOKBACK
    used = UsageRecord.objects.filter(created_at__gte=since).values_list("model", flat=True)
    unpriced = sorted(
        {m for m in used.distinct()[:1000] if m and not any(glob_matches(g, m) for g in globs)}
    )
    if not unpriced:
        return []
    msg = W003_MSG.format(models=", ".join(repr(m) for m in unpriced[:20]))
    return [Warning(msg, hint=W003_HINT, id="quotas.W003")]


@register("quotas", Tags.urls)
def check_middleware(**kwargs: Any) -> list[CheckMessage]:
    if "quotas.middleware.QuotaMiddleware" in settings.MIDDLEWARE:
        return []
    rest = getattr(settings, "REST_FRAMEWORK", {}) or {}
    throttles = rest.get("DEFAULT_THROTTLE_CLASSES", [])
    if any("TokenQuotaThrottle" in str(path) for path in throttles) or _a_view_uses_it():
        return [Warning(W001_MSG, hint=W001_HINT, id="quotas.W001")]
    return []


def _a_view_uses_it() -> bool:
    """Whether a DRF view in the URLconf lists ``TokenQuotaThrottle`` itself."""

    def uses_it(callback: Any) -> bool:
        throttles = getattr(getattr(callback, "cls", None), "throttle_classes", ())
        return any(issubclass(t, TokenQuotaThrottle) for t in throttles)

    return _a_view_is(uses_it)


def _a_view_is(test: Any) -> bool:
    """Whether ``test(callback)`` holds for a view of the URLconf."""

    def walk(patterns: list[Any]) -> bool:
        for pattern in patterns:
            if isinstance(pattern, URLResolver) and walk(pattern.url_patterns):
                return True
            if isinstance(pattern, URLPattern) and test(pattern.callback):
                return True
        return False

    return walk(get_resolver().url_patterns)


@register("quotas", Tags.urls)
def check_metrics(**kwargs: Any) -> list[CheckMessage]:
    """The metrics settings are valid; the metrics view is not mounted without its library."""
    errors: list[CheckMessage] = []
    token = quota_settings.METRICS_TOKEN
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        rule = "None or a string of at least 16 characters"
        errors.append(
            Error(E011_MSG.format(key="METRICS_TOKEN", rule=rule, value="..."), id="quotas.E011")
        )
    networks = quota_settings.METRICS_ALLOWED_IPS
    if not _valid_networks(networks):
        rule = "a list of IP addresses or networks"
        msg = E011_MSG.format(key="METRICS_ALLOWED_IPS", rule=rule, value=networks)
        errors.append(Error(msg, id="quotas.E011"))
    if not telemetry.AVAILABLE and _a_view_is(_is_metrics_view):
        errors.append(Warning(W004_MSG, hint=W004_HINT, id="quotas.W004"))
    return errors


@register("quotas")
def check_alerts(**kwargs: Any) -> list[CheckMessage]:
    """``QUOTAS["ALERTS"]`` parses into rules."""
    try:
        parse_rules(quota_settings.ALERTS)
    except ValueError as exc:
        return [Error(str(exc), hint=E012_HINT, id="quotas.E012")]
    return []


def _is_metrics_view(callback: Any) -> bool:
    view = getattr(callback, "view_class", None)
    return isinstance(view, type) and issubclass(view, MetricsView)


def _valid_networks(networks: Any) -> bool:
    if isinstance(networks, str) or not isinstance(networks, list | tuple):
        return False
    try:
        for network in networks:
            ipaddress.ip_network(str(network), strict=False)
    except ValueError:
        return False
    return True
