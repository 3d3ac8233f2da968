"""The public Python API: ``reserve``, ``settle``, ``refund``, ``budget_for``.

Host code that calls an LLM outside a view (a Celery task, a script) uses these directly::

    reservation = services.reserve(user, estimate.total, model="gpt-4o")
    response = call_llm(...)
    services.settle(reservation, prompt_tokens=..., completion_tokens=...)

Steady state: one Redis round trip and no database query per ``reserve``. The user's limits
live in their window hash; a plan or quota edit drops them, and the next request reloads them.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from quotas.batching import Batcher
from quotas.conf import quota_settings
from quotas.core.bounds import check_model_name, check_reservation_id, check_token_figure
from quotas.core.breaker import BreakerState, CircuitBreaker
from quotas.core.estimate import Estimate
from quotas.core.types import (
    Limits,
    QuotaState,
    ReserveResult,
    ReserveStatus,
    SettleResult,
    Snapshot,
    WindowSpec,
)
from quotas.exceptions import ConfigurationError, QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.models import Plan, UsageRecord, UserQuota
from quotas.signals import budget_threshold_crossed, quota_exceeded, usage_settled

__all__ = [
    "Reservation",
    "broker_state",
    "budget_for",
    "estimate",
    "get_store",
    "limits_for",
    "move_to_plan",
    "redis_key_prefix",
    "refund",
    "reserve",
    "reset_window",
    "settle",
    "settle_later",
]

logger = logging.getLogger("quotas")

# The epoch of reservations served while Redis was unavailable (real epochs are hex).
DEGRADED_EPOCH = "degraded"

User: TypeAlias = AbstractBaseUser | AnonymousUser


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one request until it is settled.

    ``state`` (and ``limit``, ``remaining``, ``reset_seconds``) describe the user's budget
    right after this reservation; ``degraded`` is true when Redis was unavailable and the
    request was let through under the fail-open policy (its usage still goes to the ledger).
    """

    id: str
    scope: str
    user_id: int | None
    model: str
    estimated_tokens: int
    reserved_at_ms: int
    state: QuotaState
    epoch: str = ""
    plan_slug: str = ""
    degraded: bool = False
    # What ``settle`` made of this object: a later automatic settle (the middleware's, after a
    # view settled itself) then knows there is nothing left to do, without asking Redis.
    settlements: list[Settlement] = field(default_factory=list, compare=False, repr=False)

    @property
    def limit(self) -> int:
        return self.state.limit

    @property
    def remaining(self) -> int:
        return self.state.remaining

    @property
    def reset_seconds(self) -> float:
        return self.state.reset_seconds


# -- runtime: the store and the breaker, one per process ----------------------------------
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


def _reservation_ttl_ms() -> int:
    ttl = _runtime.get("ttl_ms")
    if ttl is None:
        ttl = _runtime["ttl_ms"] = int(quota_settings.RESERVATION_TTL_SECONDS * 1000)
    return ttl


def get_store() -> Any:
    """The process's ``RedisWindowStore`` on the configured django-redis alias."""
    store = _runtime.get("store")
    if store is None:
        from django_redis import get_redis_connection

        from quotas.backends.redis import RedisWindowStore

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
    from django.conf import settings
    from django.core.cache import caches

    alias = quota_settings.CACHE_ALIAS
    config = settings.CACHES.get(alias, {})
    if not any(name in config for name in CACHE_KEY_SETTINGS):
        return str(quota_settings.KEY_PREFIX)
    return str(caches[alias].make_key(quota_settings.KEY_PREFIX))


def get_breaker() -> CircuitBreaker:
    breaker = _runtime.get("breaker")
    if breaker is None:
        breaker = _runtime["breaker"] = CircuitBreaker(
            failures=quota_settings.BREAKER_FAILURES,
            reset_after=quota_settings.BREAKER_RESET_SECONDS,
            on_change=_log_breaker_change,
        )
    return breaker


def _log_breaker_change(old: BreakerState, new: BreakerState) -> None:
    # One line per state change, not one per request.
    log = logger.info if new is BreakerState.CLOSED else logger.warning
    log("quotas: Redis circuit breaker %s -> %s", old.value, new.value)


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
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


# -- who and how much -----------------------------------------------------------------------
def scope_for(user: User | None, client_address: str | None = None) -> str:
    """The quota key: the user's primary key, or ``anon-<address>`` for anonymous clients."""
    if user is not None and user.is_authenticated:
        return str(user.pk)
    if not client_address:
        raise ConfigurationError("An anonymous request needs a client address for its quota.")
    return f"anon-{client_address}"


def _limits_from_plan(plan: Plan, override: int | None = None) -> Limits:
    return Limits(
        tokens_per_window=override or plan.tokens_per_hour,
        plan_slug=plan.slug,
        plan_name=plan.name,
        max_tokens_per_request=plan.max_tokens_per_request,
        requests_per_minute=plan.requests_per_minute,
        max_concurrent_requests=plan.max_concurrent_requests,
        default_output_tokens=plan.default_output_tokens,
    )


def limits_for(user: User | None) -> Limits:
    """Effective limits: the user's override, else their plan, else the default plan.

    Raises ``ConfigurationError`` when no plan applies (never a silent "unlimited").
    """
    if user is None or not user.is_authenticated:
        return _anonymous_limits()
    quota = UserQuota.objects.select_related("plan").filter(user_id=user.pk).first()
    plan = quota.plan if quota and quota.plan and quota.plan.is_active else None
    plan = plan or Plan.objects.filter(is_default=True, is_active=True).first()
    if plan is None:
        raise ConfigurationError(
            f"User {user.pk} has no plan and no default plan is set: mark one active plan "
            "as the default, or give the user a plan."
        )
    return _limits_from_plan(plan, quota.tokens_per_hour_override if quota else None)


def _anonymous_limits() -> Limits:
    slug = quota_settings.ANONYMOUS_PLAN
    plan = Plan.objects.filter(slug=slug, is_active=True).first() if slug else None
    if plan is None:
        raise ConfigurationError(f"QUOTAS['ANONYMOUS_PLAN'] names no active plan ({slug!r}).")
    return _limits_from_plan(plan)


def estimate(body: Any) -> Estimate:
    """Estimate a request body with the configured estimator (``QUOTAS["ESTIMATOR"]``).

    Raises ``quotas.core.estimate.InvalidRequest`` (a ``ValueError``) naming the bad field.
    """
    estimator = import_string(quota_settings.ESTIMATOR)
    return estimator(
        body,
        fallback_encoding=quota_settings.FALLBACK_ENCODING,
        allow_download=quota_settings.ALLOW_ENCODING_DOWNLOAD,
    )


def ledger_seed(scope: str, spec: WindowSpec, now_ms: int) -> list[tuple[int, int]]:
    """Tokens per bucket still live in the window, from the ledger (to rebuild a lost window).

    A bucket counts until its end is a window old, so one bucket more than the window is read.
    """
    since = datetime.fromtimestamp((now_ms - spec.window_ms - spec.bucket_ms) / 1000, tz=UTC)
    totals: dict[int, int] = {}
    rows = UsageRecord.objects.filter(scope=scope, created_at__gt=since)
    for created_at, tokens in rows.values_list("created_at", "actual_tokens").iterator():
        bucket = spec.bucket_of(int(created_at.timestamp() * 1000))
        totals[bucket] = totals.get(bucket, 0) + tokens
    return sorted(totals.items())


def _now_ms() -> int:
    return int(timezone.now().timestamp() * 1000)


# -- reserve --------------------------------------------------------------------------------
def reserve(
    user: User | None,
    tokens: int,
    *,
    model: str = "",
    request_id: str | None = None,
    client_address: str | None = None,
    add_default_output: bool = False,
) -> Reservation:
    """Hold ``tokens`` of the user's budget for one LLM call, atomically across every limit.

    ``add_default_output`` adds the plan's default output allowance to ``tokens`` (for a
    request that names no ``max_tokens``). Anonymous clients need ``client_address``.
    Raises ``QuotaExceeded`` (retry later), ``RequestTooLarge`` (never fits), or
    ``StoreUnavailable`` when Redis is down and ``QUOTAS["FAILURE_POLICY"]`` is ``"closed"``;
    ``InvalidRequest`` (a ``ValueError``) when ``tokens`` is not an integer from 0 to
    ``quotas.core.bounds.MAX_TOKENS``, or ``model`` or the reservation id is not a name the
    ledger can store (over 200 characters, or with control characters): nothing is reserved.
    """
    check_token_figure(tokens, "tokens", minimum=0)
    check_model_name(model)
    scope = scope_for(user, client_address)
    rid = f"{scope}/{request_id or secrets.token_hex(16)}"  # 128 random bits, as hex
    if request_id:
        check_reservation_id(rid)
    try:
        result = _guarded(_reserve_in_store, user, scope, rid, tokens, model, add_default_output)
    except StoreUnavailable:
        if quota_settings.FAILURE_POLICY == "closed":
            raise
        return _degraded_reservation(user, scope, rid, tokens, model, add_default_output)
    return _decide(user, scope, rid, model, result)


def _reserve_in_store(
    user: User | None, scope: str, rid: str, tokens: int, model: str, add_output: bool
) -> ReserveResult:
    store = get_store()
    ttl_ms = _reservation_ttl_ms()
    attempts = int(quota_settings.REJECTED_PER_MINUTE or 0)
    result = store.reserve(
        scope,
        rid,
        tokens,
        ttl_ms=ttl_ms,
        model=model,
        add_default_output=add_output,
        attempts_limit=attempts,
    )
    if result.status is ReserveStatus.NEEDS_CONFIG:
        # Limits not cached (first request, or a plan changed), maybe the window is lost too.
        limits, seed, epoch = _config_for(user, scope, rebuild=not result.window_has_epoch)
        result = store.reserve(
            scope,
            rid,
            tokens,
            ttl_ms=ttl_ms,
            limits=limits,
            epoch=epoch,
            model=model,
            add_default_output=add_output,
            seed=seed,
            attempts_limit=attempts,
        )
    return result


def _config_for(
    user: User | None, scope: str, *, rebuild: bool
) -> tuple[Limits, list[tuple[int, int]], str]:
    limits = limits_for(user)
    seed = ledger_seed(scope, window_spec(), _now_ms()) if rebuild else []
    if rebuild and seed:
        logger.info("quotas: rebuilt the window of %s from the ledger", scope)
        transaction.on_commit(lambda: _schedule_audit(scope))
    return limits, seed, uuid.uuid4().hex[:8]


def _schedule_audit(scope: str) -> None:
    """Audit a rebuilt window once the usage in flight at the rebuild has landed.

    A rebuild reads the ledger as it stands; rows other processes are still writing (requests
    served while their circuit breakers were open) are missing from it. Every breaker probes
    within ``BREAKER_RESET_SECONDS``, so an audit a little later sees them all. If the broker
    cannot take the task, the periodic ``audit_windows`` repairs the window instead.
    """
    from quotas.tasks import audit_window_task

    countdown = 2 * quota_settings.BREAKER_RESET_SECONDS + 5
    try:
        audit_window_task.apply_async(args=[scope], countdown=countdown, retry=False)
    except Exception:  # the broker is down: the periodic audit will get there
        logger.warning("quotas: could not schedule the audit of rebuilt window %s", scope)


def _decide(
    user: User | None, scope: str, rid: str, model: str, result: ReserveResult
) -> Reservation:
    tokens = result.tokens
    state = result.state(window_spec().window_seconds)
    if result.status is ReserveStatus.ALLOWED:
        _maybe_alert(user, scope, tokens, result)
        return Reservation(
            id=rid,
            scope=scope,
            user_id=_user_id(user),
            model=model,
            estimated_tokens=tokens,
            reserved_at_ms=result.now_ms,
            state=state,
            epoch=result.epoch,
            plan_slug=result.plan_slug,
        )
    if result.status is ReserveStatus.DUPLICATE_ID:
        raise ValueError(f"Reservation {rid!r} already exists: request ids must be unique.")
    exc = _rejection(tokens, result, state)
    quota_exceeded.send(sender=Reservation, user=user, scope=scope, exception=exc)
    raise exc


def _rejection(
    tokens: int, result: ReserveResult, state: QuotaState
) -> QuotaExceeded | RequestTooLarge:
    if result.status is ReserveStatus.OVER_REQUEST_CAP:
        return RequestTooLarge(
            limit=result.max_tokens_per_request,
            requested=tokens,
            reason="the per-request cap",
            state=state,
        )
    if result.status is ReserveStatus.OVER_BUDGET:
        return RequestTooLarge(
            limit=result.limit, requested=tokens, reason="the whole budget", state=state
        )
    if result.status is ReserveStatus.OVER_ATTEMPTS:
        # Too many rejected requests (see quotas.attempts): figures in attempts.
        return QuotaExceeded(
            limit=int(quota_settings.REJECTED_PER_MINUTE),
            remaining=0,
            requested=1,
            retry_after=result.retry_after,
            scope="attempts",
            reset_seconds=result.retry_after,
            state=state,
        )
    if result.status is ReserveStatus.OVER_REQUESTS:
        # In the units of the limit that refused: this one request against the minute's.
        return QuotaExceeded(
            limit=result.requests_limit,
            remaining=max(result.requests_remaining, 0),
            requested=1,
            retry_after=result.retry_after,
            scope="requests",
            reset_seconds=result.requests_reset_seconds,
            state=state,
        )
    if result.status is ReserveStatus.OVER_CONCURRENCY:
        return QuotaExceeded(
            limit=result.concurrency_limit,
            remaining=max(result.concurrency_limit - result.in_flight, 0),
            requested=1,
            retry_after=result.retry_after,
            scope="concurrency",
            state=state,
        )
    return QuotaExceeded(
        limit=result.limit,
        remaining=max(result.remaining, 0),
        requested=tokens,
        retry_after=result.retry_after,
        scope="tokens",
        reset_seconds=result.reset_seconds,
        state=state,
    )


def _maybe_alert(user: User | None, scope: str, tokens: int, result: ReserveResult) -> None:
    threshold = quota_settings.ALERT_THRESHOLD
    used = result.limit - result.remaining
    mark = threshold * result.limit
    if threshold and used - tokens < mark <= used:
        budget_threshold_crossed.send(
            sender=Reservation,
            user=user,
            scope=scope,
            used=used,
            limit=result.limit,
            threshold=threshold,
        )


def _degraded_reservation(
    user: User | None, scope: str, rid: str, tokens: int, model: str, add_output: bool
) -> Reservation:
    """Fail-open: serve without Redis. The per-request cap still holds (it needs no Redis)."""
    limits = limits_for(user)
    tokens += limits.default_output_tokens if add_output else 0
    cap = limits.max_tokens_per_request
    if cap and tokens > cap:
        raise RequestTooLarge(limit=cap, requested=tokens, reason="the per-request cap")
    if tokens > limits.tokens_per_window:
        raise RequestTooLarge(
            limit=limits.tokens_per_window, requested=tokens, reason="the whole budget"
        )
    window = window_spec().window_seconds
    return Reservation(
        id=rid,
        scope=scope,
        user_id=_user_id(user),
        model=model,
        estimated_tokens=tokens,
        reserved_at_ms=_now_ms(),
        state=QuotaState(limits.tokens_per_window, 0, 0.0, window, degraded=True),
        epoch=DEGRADED_EPOCH,
        plan_slug=limits.plan_slug,
        degraded=True,
    )


def _user_id(user: User | None) -> int | None:
    return user.pk if user is not None and user.is_authenticated else None


# -- settle ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settlement:
    """What a settle did. ``settled_now`` is false for a repeated settle (nothing changed);
    ``remaining`` is ``None`` when Redis could not be reached (the ledger still has the row)."""

    reservation_id: str
    estimated_tokens: int
    actual_tokens: int
    applied_tokens: int
    settled_now: bool
    remaining: int | None


def settle(
    reservation_or_id: Reservation | str,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    total_tokens: int | None = None,
    status: str = "settled",
) -> Settlement:
    """Replace the estimate with the actual usage; idempotent by reservation id.

    Give ``total_tokens``, or ``prompt_tokens`` and/or ``completion_tokens``; with none of
    them the estimate stands. The difference goes to the bucket the reservation was charged
    to, and the ledger record goes to the Redis outbox in the same atomic step. The record
    is also sent to the Celery worker in this process's next batch (see ``send_to_ledger``);
    whichever arrives first writes the row, exactly once.
    """
    job = _settle_job(reservation_or_id, prompt_tokens, completion_tokens, total_tokens, status)
    try:
        result: SettleResult | StoreUnavailable = _guarded(
            get_store().settle, **job.store_arguments()
        )
    except StoreUnavailable as exc:
        result = exc
    outcome = _finish_settle(job, result)
    if isinstance(reservation_or_id, Reservation):
        reservation_or_id.settlements.append(outcome)
    return outcome


def refund(reservation_or_id: Reservation | str) -> Settlement:
    """Give back the whole reservation: the LLM call failed and nothing was used."""
    return settle(reservation_or_id, total_tokens=0, status="refunded")


def settle_later(
    reservation: Reservation,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    total_tokens: int | None = None,
    status: str = "settled",
) -> int:
    """``settle``, sent from this process's next settle batch instead of now.

    Returns the tokens the settle will charge (the estimate when no usage is given), so the
    caller can tell the budget left after this request (``reservation.state.remaining +
    estimated_tokens - charged``) without waiting. Batches go every ``SETTLE_BATCH_SECONDS``,
    one round trip each; with ``SETTLE_BATCH_SECONDS = 0`` this settles at once. Bad figures
    raise ``ValueError`` here, as ``settle`` does. Used by ``QuotaMiddleware`` when
    ``SETTLE_BATCH_SECONDS`` is above 0 (see the README for what that trades).
    """
    job = _settle_job(reservation, prompt_tokens, completion_tokens, total_tokens, status)
    if quota_settings.SETTLE_BATCH_SECONDS > 0:
        _settle_batcher().add(job)
    else:
        _settle_batch([job])
    return job.reservation.estimated_tokens if job.actual is None else job.actual


def flush_settle_batch() -> int:
    """Send this process's waiting settles now; returns how many were sent."""
    return _settle_batcher().flush()


@dataclass(frozen=True)
class _SettleJob:
    """A settle's validated figures, ready for the store."""

    reservation: Reservation
    actual: int | None
    status: str
    prompt: int | None
    completion: int | None

    def store_arguments(self) -> dict[str, Any]:
        reservation = self.reservation
        return {
            "scope": reservation.scope,
            "reservation_id": reservation.id,
            "actual_tokens": self.actual,
            "epoch": reservation.epoch,
            "status": self.status,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "estimate": reservation.estimated_tokens,
            "reserved_at_ms": reservation.reserved_at_ms,
            "model": reservation.model,
        }


def _settle_job(
    reservation_or_id: Reservation | str,
    prompt: int | None,
    completion: int | None,
    total: int | None,
    status: str,
) -> _SettleJob:
    reservation = _as_reservation(reservation_or_id)
    actual = _actual_tokens(prompt, completion, total)
    if reservation.degraded:
        # Served without Redis, so nothing was charged: the settle script charges the real
        # usage to a built window now (its epoch never matches DEGRADED_EPOCH), or leaves it
        # to the ledger row when the window is still to be rebuilt.
        status = "degraded"
        actual = reservation.estimated_tokens if actual is None else actual
    return _SettleJob(reservation, actual, status, prompt, completion)


def _finish_settle(job: _SettleJob, result: SettleResult | StoreUnavailable) -> Settlement:
    """The settlement of the store's answer; sends the ledger record and the signal."""
    reservation = job.reservation
    if isinstance(result, StoreUnavailable):
        # The ledger row is still written; the window keeps the estimate until the audit
        # task repairs it or it ages out.
        logger.warning("quotas: Redis unavailable while settling %s; ledger only", reservation.id)
        used = reservation.estimated_tokens if job.actual is None else job.actual
        outcome = Settlement(reservation.id, reservation.estimated_tokens, used, 0, True, None)
    else:
        if result.status == 1:
            # Redis knows the reservation best (settling by id alone knows nothing else).
            reservation = replace(
                reservation,
                estimated_tokens=result.estimate,
                reserved_at_ms=result.reserved_at_ms,
                model=reservation.model or result.model,
            )
        outcome = Settlement(
            reservation.id,
            reservation.estimated_tokens,
            result.actual,
            result.applied,
            result.settled_now,
            result.remaining,
        )
    if outcome.settled_now:
        send_to_ledger(
            usage_payload(
                reservation, outcome.actual_tokens, job.prompt, job.completion, job.status
            )
        )
        usage_settled.send(
            sender=Reservation,
            user_id=reservation.user_id,
            scope=reservation.scope,
            reservation_id=reservation.id,
            estimated_tokens=outcome.estimated_tokens,
            actual_tokens=outcome.actual_tokens,
        )
    return outcome


def _settle_batch(jobs: list[_SettleJob]) -> None:
    """Send settles in one round trip and finish each (in the batcher's thread, mostly)."""
    try:
        results: list[SettleResult | StoreUnavailable] = _guarded(
            get_store().settle_many, [job.store_arguments() for job in jobs]
        )
    except StoreUnavailable as exc:
        results = [exc] * len(jobs)
    for job, result in zip(jobs, results, strict=True):
        try:
            _finish_settle(job, result)
        except Exception:  # one record's trouble must not cost the others theirs
            logger.exception("quotas: could not finish settling %s", job.reservation.id)


def _settle_batcher() -> Batcher[_SettleJob]:
    global _settler
    if _settler is None:
        # The ledger batcher first: exit hooks run last-registered first, so the settles left
        # at exit reach the ledger batch before it is sent.
        _ledger_batcher()
        _settler = Batcher(
            _settle_batch,
            interval=lambda: _interval(quota_settings.SETTLE_BATCH_SECONDS),
            size=lambda: int(quota_settings.LEDGER_BATCH_SIZE),
            name="quotas-settle-batch",
        )
    return _settler


_settler: Batcher[_SettleJob] | None = None


def _as_reservation(reservation_or_id: Reservation | str) -> Reservation:
    if isinstance(reservation_or_id, Reservation):
        return reservation_or_id
    scope, sep, _ = str(reservation_or_id).partition("/")
    if not sep or not scope:
        raise ValueError(f"Not a reservation id: {reservation_or_id!r}.")
    # Settling by id alone: Redis holds the estimate, bucket and model. An empty epoch tells
    # the script never to charge an id it does not know.
    return Reservation(
        id=str(reservation_or_id),
        scope=scope,
        user_id=int(scope) if scope.isdigit() else None,
        model="",
        estimated_tokens=0,
        reserved_at_ms=_now_ms(),
        state=QuotaState(0, 0, 0.0, window_spec().window_seconds),
    )


def _actual_tokens(prompt: int | None, completion: int | None, total: int | None) -> int | None:
    for name, value in (
        ("prompt_tokens", prompt),
        ("completion_tokens", completion),
        ("total_tokens", total),
    ):
        if value is not None:
            check_token_figure(value, name, minimum=0)
    if total is not None:
        return total
    if prompt is not None or completion is not None:
        return (prompt or 0) + (completion or 0)
    return None


# -- the ledger -----------------------------------------------------------------------------
def usage_payload(
    reservation: Reservation,
    actual: int,
    prompt: int | None,
    completion: int | None,
    status: str,
) -> dict[str, Any]:
    """The primitives a ledger row is made from (what the Celery task receives)."""
    return {
        "request_id": reservation.id,
        "scope": reservation.scope,
        "user_id": reservation.user_id,
        "model": reservation.model,
        "estimated_tokens": reservation.estimated_tokens,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "actual_tokens": actual,
        "status": str(status),
        "reserved_at_ms": reservation.reserved_at_ms,
        "settled_at_ms": _now_ms(),
    }


def send_to_ledger(payload: dict[str, Any]) -> None:
    """Send a ledger record to the Celery worker: in this process's next batch (every
    ``LEDGER_BATCH_SECONDS``), or alone after the current transaction commits when that is 0.
    Rows are written directly when the broker cannot take the task, so no usage is lost."""
    from quotas.health import backlog_watch

    backlog_watch().start()  # no Redis call: a flag check once its thread runs
    if quota_settings.LEDGER_BATCH_SECONDS > 0:
        _ledger_batcher().add(payload)
    else:
        transaction.on_commit(lambda: _enqueue_or_write([payload]))


def flush_ledger_batch() -> int:
    """Send this process's waiting ledger records now; returns how many were sent."""
    return _ledger_batcher().flush()


def _ledger_batcher() -> Batcher[dict[str, Any]]:
    # One per process for its whole life (it outlives settings changes: it reads them live).
    global _batcher
    if _batcher is None:
        _batcher = Batcher(
            _enqueue_or_write,
            interval=lambda: _interval(quota_settings.LEDGER_BATCH_SECONDS),
            size=lambda: int(quota_settings.LEDGER_BATCH_SIZE),
        )
    return _batcher


_batcher: Batcher[dict[str, Any]] | None = None


def _interval(seconds: float) -> float:
    # 0 turns batching off (nothing is queued), so a thread started earlier wakes rarely.
    return float(seconds) if seconds > 0 else 1.0


def _enqueue_or_write(payloads: list[dict[str, Any]]) -> None:
    from quotas import ledger
    from quotas.tasks import record_usage_task

    # A dead broker costs one failed publish (up to its socket timeout) per probe period,
    # not one per batch: while its breaker is open, rows are written directly.
    breaker = _broker_breaker()
    if breaker.allow():
        try:
            # Celery would otherwise build the log's repr of the records (``saferepr``): about
            # half the cost of a publish, and the users' usage figures in the worker's log.
            record_usage_task.apply_async(
                args=[payloads], retry=False, argsrepr=_records_repr(payloads), kwargsrepr="{}"
            )
        except Exception:  # the broker is down or refused: write the rows ourselves
            breaker.record_failure()
            logger.warning(
                "quotas: broker unavailable; writing %d usage records directly", len(payloads)
            )
        else:
            breaker.record_success()
            _runtime["broker_seen"] = True
            return
    ledger.write_usage(payloads)


def _records_repr(payloads: list[dict[str, Any]]) -> str:
    """What the worker's log shows of a ``record_usage`` task's records."""
    ids = [str(payload.get("request_id", "?")) for payload in payloads[:3]]
    more = f", ... {len(payloads) - len(ids)} more" if len(payloads) > len(ids) else ""
    return f"[{len(payloads)} usage records: {', '.join(ids)}{more}]"


def broker_state() -> str:
    """What this process knows of the Celery broker from publishing ledger batches: ``"ok"``,
    ``"unavailable"`` (its breaker is open: rows are written directly) or ``"unknown"``."""
    if _broker_breaker().state is not BreakerState.CLOSED:
        return "unavailable"
    return "ok" if _runtime.get("broker_seen") else "unknown"


def _broker_breaker() -> CircuitBreaker:
    breaker = _runtime.get("broker_breaker")
    if breaker is None:
        breaker = _runtime["broker_breaker"] = CircuitBreaker(
            failures=1, reset_after=quota_settings.BREAKER_RESET_SECONDS
        )
    return breaker


# -- snapshots and admin actions ------------------------------------------------------------
def budget_for(user: User) -> dict[str, Any]:
    """The caller's budget as ``GET /quotas/me/`` shows it: ``used`` includes ``reserved``;
    ``remaining`` is never negative, and ``debt`` is the usage beyond the limit (served
    requests that used more than their estimate) that must age out before ``remaining``
    grows again."""
    limits = limits_for(user)
    scope = scope_for(user)
    try:
        snapshot = _guarded(_peek, user, scope, limits)
    except StoreUnavailable:
        return _budget_dict(limits, None)
    return _budget_dict(limits, snapshot)


def _peek(user: User, scope: str, limits: Limits) -> Snapshot:
    store = get_store()
    snapshot = store.peek(scope)
    if isinstance(snapshot, Snapshot) and snapshot.plan_slug == limits.plan_slug:
        return snapshot
    rebuild = snapshot is False
    _, seed, epoch = _config_for(user, scope, rebuild=rebuild) if rebuild else (None, [], "")
    result = store.peek(scope, limits=limits, epoch=epoch or uuid.uuid4().hex[:8], seed=seed)
    assert isinstance(result, Snapshot)
    return result


def _budget_dict(limits: Limits, snapshot: Snapshot | None) -> dict[str, Any]:
    spec = window_spec()
    base = {
        "plan": {"slug": limits.plan_slug, "name": limits.plan_name},
        "window_seconds": spec.window_seconds,
        "limit": limits.tokens_per_window,
        "max_tokens_per_request": limits.max_tokens_per_request,
        "requests_per_minute": limits.requests_per_minute,
        "max_concurrent_requests": limits.max_concurrent_requests,
    }
    if snapshot is None:
        return {
            **base,
            "used": None,
            "reserved": None,
            "remaining": None,
            "debt": None,
            "reset_seconds": None,
            "requests_used": None,
            "in_flight": None,
            "degraded": True,
        }
    return {
        **base,
        "used": snapshot.used,
        "reserved": snapshot.reserved,
        # Usage above the estimate is charged even past the limit: what the window holds
        # beyond it is debt, shown on its own, so ``remaining`` never goes below 0.
        "remaining": max(snapshot.remaining, 0),
        "debt": max(-snapshot.remaining, 0),
        "reset_seconds": snapshot.reset_seconds,
        "requests_used": snapshot.requests_used if limits.requests_per_minute else None,
        "in_flight": snapshot.in_flight,
        "degraded": False,
    }


def reset_window(user: User) -> None:
    """Give the user's whole budget back now (admin action)."""
    get_store().reset(scope_for(user))


def forget_limits_of(user_ids: list[int] | None) -> None:
    """Make the next request of these users (all users when ``None``) reload their limits."""
    try:
        store = get_store()
        if user_ids is None:
            store.forget_all_limits()
        else:
            store.forget_limits([str(pk) for pk in user_ids])
    except StoreUnavailable:
        logger.warning("quotas: Redis unavailable; limits will reload when their keys expire")


def move_to_plan(user_ids: list[int], plan: Plan) -> int:
    """Put these users on ``plan`` (admin action); their next request uses it."""
    with transaction.atomic():
        existing = set(
            UserQuota.objects.filter(user_id__in=user_ids).values_list("user_id", flat=True)
        )
        UserQuota.objects.filter(user_id__in=existing).update(plan=plan)
        UserQuota.objects.bulk_create(
            [UserQuota(user_id=pk, plan=plan) for pk in user_ids if pk not in existing]
        )
        # Bulk updates send no signals: drop the cached limits ourselves, after commit.
        transaction.on_commit(lambda: forget_limits_of(list(user_ids)))
    return len(user_ids)
