"""Reserve: hold a request's estimated tokens, atomically across every limit, before the LLM
call. One Redis round trip in steady state; a refusal charges nothing."""

from __future__ import annotations

import secrets

from quotas.conf import quota_settings
from quotas.core.bounds import check_model_name, check_reservation_id, check_token_figure
from quotas.core.types import QuotaState, ReserveResult, ReserveStatus
from quotas.engine.plans import User, limits_for, scope_for, user_id_of
from quotas.engine.runtime import (
    get_store,
    guarded,
    now_ms,
    reservation_ttl_ms,
    window_spec,
)
from quotas.engine.seeding import config_for
from quotas.engine.types import DEGRADED_EPOCH, Reservation
from quotas.exceptions import QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.signals import budget_threshold_crossed, quota_exceeded

__all__ = ["reserve"]


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
        result = guarded(_reserve_in_store, user, scope, rid, tokens, model, add_default_output)
    except StoreUnavailable:
        if quota_settings.FAILURE_POLICY == "closed":
            raise
        return _degraded_reservation(user, scope, rid, tokens, model, add_default_output)
    return _decide(user, scope, rid, model, result)


def _reserve_in_store(
    user: User | None, scope: str, rid: str, tokens: int, model: str, add_output: bool
) -> ReserveResult:
    store = get_store()
    ttl_ms = reservation_ttl_ms()
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
        limits, seed, epoch = config_for(user, scope, rebuild=not result.window_has_epoch)
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
            user_id=user_id_of(user),
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
        user_id=user_id_of(user),
        model=model,
        estimated_tokens=tokens,
        reserved_at_ms=now_ms(),
        state=QuotaState(limits.tokens_per_window, 0, 0.0, window, degraded=True),
        epoch=DEGRADED_EPOCH,
        plan_slug=limits.plan_slug,
        degraded=True,
    )
