"""``GET metrics``: the Prometheus exposition of the quota service, for the host to mount.

The host mounts and protects it (it is not in ``quotas.urls``)::

    from quotas.api.metrics import MetricsView
    urlpatterns += [path("metrics", MetricsView.as_view())]

Who may scrape: a staff user (session), a request with ``Authorization: Bearer <token>``
matching ``QUOTAS["METRICS_TOKEN"]``, or a client address in
``QUOTAS["METRICS_ALLOWED_IPS"]`` (addresses or networks; ``REMOTE_ADDR``, or the address the
outermost of ``NUM_PROXIES`` trusted proxies saw). Anyone else: 401 (a token is configured and
none was sent) or 403.

Besides what ``quotas.telemetry`` counts in every process, a scrape reads once (one Redis
round trip and one database query): the ledger backlog and its lag, deferred jobs by status,
and each provider's shared circuit breaker.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views import View

from quotas import services, telemetry
from quotas.conf import quota_settings
from quotas.exceptions import StoreUnavailable
from quotas.http import client_address
from quotas.models import DeferredJob

__all__ = ["MetricsView", "exposition", "may_scrape"]

logger = logging.getLogger("quotas")
PROVIDER_BREAKERS = {"closed": 0, "half-open": 1, "open": 2}


class ScrapeFigures:
    """A collector of the figures read at scrape time (shared state, not per process)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("quotas_redis_up", "Whether Redis answered this scrape (1/0).")
        try:
            backlog = services.ledger_backlog()
        except StoreUnavailable:
            backlog = None
        up.add_metric([], 0 if backlog is None else 1)
        yield up
        if backlog is not None:
            yield from _backlog_families(GaugeMetricFamily, backlog)
            yield _provider_breakers(GaugeMetricFamily)
        jobs = _jobs_family(GaugeMetricFamily)
        if jobs is not None:
            yield jobs


def _backlog_families(family: Any, backlog: Any) -> Iterator[Any]:
    waiting = family(
        "quotas_ledger_outboxes_waiting",
        "Redis outboxes holding ledger records not yet written as rows.",
    )
    waiting.add_metric([], backlog.outboxes)
    yield waiting
    lag = family(
        "quotas_ledger_lag_seconds",
        "How long the oldest ledger record not yet written has waited (0: none waits).",
    )
    lag.add_metric([], backlog.oldest_seconds or 0.0)
    yield lag


def _provider_breakers(family: Any) -> Any:
    breakers = family(
        "quotas_provider_breaker_state",
        "Each provider key and model's shared circuit breaker: 0 closed, 1 half-open, 2 open.",
        labels=["provider", "model"],
    )
    try:
        states = services.provider_states()
    except StoreUnavailable:
        states = []
    for state in states:
        value = PROVIDER_BREAKERS.get(state.breaker.get("state", "closed"), 0)
        breakers.add_metric([state.provider, state.model], value)
    return breakers


def _jobs_family(family: Any) -> Any:
    jobs = family("quotas_deferred_jobs", "Deferred jobs by status.", labels=["status"])
    try:
        rows = DeferredJob.objects.values_list("status").annotate(n=Count("pk")).order_by()
        counts = dict(rows)
    except DatabaseError:
        logger.warning("quotas: metrics could not count deferred jobs", exc_info=True)
        return None
    for status in DeferredJob.Status.values:
        jobs.add_metric([status], counts.get(status, 0))
    return jobs


def exposition() -> tuple[bytes, str]:
    """The scrape body and its content type: every process's figures (all of them under
    ``PROMETHEUS_MULTIPROC_DIR``, else this process's) and the figures read now."""
    import prometheus_client as prom
    from prometheus_client import multiprocess, values

    if values.ValueClass is values.MutexValue:  # one process (no PROMETHEUS_MULTIPROC_DIR)
        counted = prom.generate_latest(prom.REGISTRY)
    else:
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        counted = prom.generate_latest(registry)
    now = prom.CollectorRegistry()
    now.register(ScrapeFigures())  # type: ignore[arg-type]
    return counted + prom.generate_latest(now), prom.CONTENT_TYPE_LATEST


def may_scrape(request: HttpRequest) -> bool:
    """Whether ``request`` may read the metrics (see the module's docstring)."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = quota_settings.METRICS_TOKEN
    sent = request.headers.get("Authorization", "")
    given = sent[7:].strip().encode() if sent.startswith("Bearer ") else b""
    if token and given and hmac.compare_digest(given, str(token).encode()):
        return True
    return _address_allowed(client_address(request))


def _address_allowed(address: str | None) -> bool:
    networks = quota_settings.METRICS_ALLOWED_IPS or ()
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


class MetricsView(View):
    """The Prometheus text exposition, for scrapers the host allows."""

    http_method_names = ["get", "head"]

    def get(self, request: HttpRequest) -> HttpResponse:
        if not may_scrape(request):
            return _refusal(request)
        if not telemetry.AVAILABLE:
            body = "prometheus_client is not installed: pip install django-llm-quotas[metrics]\n"
            return HttpResponse(body, status=503, content_type="text/plain")
        body_bytes, content_type = exposition()
        response = HttpResponse(body_bytes, content_type=content_type)
        response["Cache-Control"] = "no-store"
        return response


def _refusal(request: HttpRequest) -> HttpResponse:
    if quota_settings.METRICS_TOKEN and "Authorization" not in request.headers:
        response = HttpResponse("Metrics need a bearer token.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse("Not allowed to read the metrics.\n", status=403)
