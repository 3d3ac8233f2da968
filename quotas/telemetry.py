"""Prometheus metrics the request path and the provider client record.

Optional: with ``prometheus_client`` installed (``pip install "django-llm-quotas[metrics]"``)
every ``record_*`` function counts; without it each is a no-op costing one function call, and
the app works the same. Framework-free (no Django): the exposition view and the figures read
at scrape time (ledger backlog, deferred jobs, provider breakers) live in
``quotas.api.metrics``.

Multiprocess (gunicorn, Celery prefork): set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
directory before the processes start (``prometheus_client`` reads it at import); every process
then writes its figures to files there and a scrape sums them. Gauges of one process's state
(its Redis circuit breaker) take the largest value among live processes.

Label values that come from traffic (model names, plan slugs) are capped per process at
``MAX_LABEL_VALUES`` distinct values per label; later ones are counted as ``"other"``, so a
client sending random model names cannot grow the scrape without bound.
"""

from __future__ import annotations

import threading
from typing import Any

from quotas.core.breaker import BreakerState
from quotas.exceptions import QuotaExceeded, RequestTooLarge, StoreUnavailable

try:  # an optional dependency: the extra ``metrics``
    import prometheus_client as prom
except ImportError:  # pragma: no cover - exercised in a subprocess without it
    prom = None  # type: ignore[assignment]

__all__ = [
    "AVAILABLE",
    "BREAKER_VALUES",
    "record_breaker",
    "record_decision",
    "record_deferred",
    "record_degraded",
    "record_settled",
    "refusal_labels",
]

AVAILABLE = prom is not None
MAX_LABEL_VALUES = 100
OTHER = "other"
# Reserve takes one Redis round trip: ~0.1-1 ms on a LAN; the top buckets catch a slow Redis.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def _make() -> dict[str, Any]:
    if prom is None:
        return {}
    return {
        "decisions": prom.Counter(
            "quotas_decisions",
            "Quota decisions by outcome (allowed, refused: 429, too_large: 413, degraded: "
            "served without Redis, unavailable: 503) and the limit that refused.",
            ["outcome", "limit"],
        ),
        "latency": prom.Histogram(
            "quotas_reserve_seconds",
            "Time to reserve a request's estimate (one decision), in seconds.",
            buckets=LATENCY_BUCKETS,
        ),
        "tokens": prom.Counter(
            "quotas_settled_tokens",
            "Tokens settled (actual usage) by model and plan.",
            ["model", "plan"],
        ),
        "cost": prom.Counter(
            "quotas_settled_cost_dollars",
            "Cost settled (actual usage at the model's price) by model and plan, in dollars.",
            ["model", "plan"],
        ),
        "breaker": prom.Gauge(
            "quotas_breaker_state",
            "The circuit breaker in front of Redis: 0 closed, 1 half-open, 2 open (the "
            "worst among live processes).",
            ["breaker"],
            multiprocess_mode="livemax",
        ),
        "transitions": prom.Counter(
            "quotas_breaker_transitions",
            "Circuit breaker state changes, by breaker and the state entered.",
            ["breaker", "state"],
        ),
        "degraded": prom.Counter(
            "quotas_degraded_requests",
            "Requests served other than as asked: by a lower rung of the plan's ladder "
            "(fallback, cache, deferred) or without Redis (store_unavailable).",
            ["rung"],
        ),
        "deferred": prom.Counter(
            "quotas_deferred_jobs_created",
            "Requests queued as deferred jobs (the last rung of a degradation ladder).",
        ),
    }


_metrics = _make()
_children: dict[tuple[str, tuple[str, ...]], Any] = {}
_seen: dict[str, set[str]] = {}
_lock = threading.Lock()


def _child(name: str, *labels: str) -> Any:
    """The labelled child of metric ``name`` (kept: ``labels()`` takes a lock and builds a
    key on every call, which the request path need not pay)."""
    key = (name, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = _metrics[name].labels(*labels)
    return child


def _capped(label: str, value: str) -> str:
    """``value``, or ``"other"`` once ``label`` has ``MAX_LABEL_VALUES`` distinct values."""
    seen = _seen.setdefault(label, set())
    if value in seen:
        return value
    with _lock:
        if len(seen) >= MAX_LABEL_VALUES:
            return OTHER
        seen.add(value)
    return value


def record_decision(outcome: str, limit: str, seconds: float | None) -> None:
    """One decision: its ``outcome``, the ``limit`` that refused (``""`` when none) and how
    long the reserve took (``None``: decided without one)."""
    if not _metrics:
        return
    _child("decisions", outcome, limit).inc()
    if seconds is not None:
        _metrics["latency"].observe(seconds)


def refusal_labels(exc: BaseException) -> tuple[str, str]:
    """The ``outcome`` and ``limit`` labels of a reserve that raised ``exc``: ``limit`` names
    the refusing limit as ``<whose>:<metric>:<window>`` (e.g. ``team:tokens:hour``,
    ``user:concurrency:-``, ``client:attempts:minute``)."""
    if isinstance(exc, QuotaExceeded | RequestTooLarge):
        outcome = "refused" if isinstance(exc, QuotaExceeded) else "too_large"
        whose = "client" if exc.scope == "attempts" else exc.limit_scope
        return outcome, f"{whose}:{exc.scope}:{exc.window or '-'}"
    if isinstance(exc, StoreUnavailable):
        return "unavailable", ""
    return "error", ""


def record_settled(model: str, plan: str, tokens: int, cost_micro: int | None) -> None:
    """A reservation settled with its actual usage (cost in micro-dollars)."""
    if not _metrics:
        return
    labels = (_capped("model", model or "unknown"), _capped("plan", plan or "none"))
    _child("tokens", *labels).inc(max(tokens, 0))
    if cost_micro:
        _child("cost", *labels).inc(max(cost_micro, 0) / 1_000_000)


def record_breaker(breaker: str, state: BreakerState, *, moved: bool = True) -> None:
    """A circuit breaker entered ``state`` (``moved=False``: a new breaker starts in it)."""
    if not _metrics:
        return
    _child("breaker", breaker).set(BREAKER_VALUES[state])
    if moved:
        _child("transitions", breaker, state.value).inc()


def record_degraded(rung: str) -> None:
    """A request served other than as asked (``rung``: ``fallback``, ``cache``,
    ``deferred`` or ``store_unavailable``)."""
    if _metrics:
        _child("degraded", rung).inc()


def record_deferred() -> None:
    """A request queued as a deferred job."""
    if _metrics:
        _metrics["deferred"].inc()
