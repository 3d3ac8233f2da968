"""Reserve: hold a request's estimate in every limit that applies to it, atomically, before the
LLM call. One Redis round trip in steady state (all the user's, team's and global layers in
one script); a refusal at any layer charges nothing at any layer."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from quotas.conf import quota_settings
from quotas.core.bounds import check_model_name, check_reservation_id, check_token_figure
from quotas.core.decisions import Decision, DecisionStatus
from quotas.core.degraded import Concurrency
from quotas.core.limits import Limit, Metric
from quotas.core.pricing import Price
from quotas.core.types import QuotaState
from quotas.engine.alerts import check_alerts
from quotas.engine.config import QuotaConfig, configs
from quotas.engine.counters import Charges, charges_for, quota_state
from quotas.engine.degraded import admit_degraded
from quotas.engine.plans import User, config_for, scope_for, user_id_of
from quotas.engine.refusals import note_refusal
from quotas.engine.runtime import (
    get_store,
    guarded_for,
    now_ms,
    reservation_ttl_ms,
    window_spec,
)
from quotas.engine.seeding import counter_seeds
from quotas.engine.types import DEGRADED_EPOCH, Reservation
from quotas.exceptions import QuotaError, QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.signals import budget_threshold_crossed, quota_exceeded
from quotas.telemetry import record_decision, record_degraded, refusal_labels

__all__ = ["reserve"]

logger = logging.getLogger("quotas")
# How often a decision may find its limits stale (an edit in between) before it gives up.
STALE_RETRIES = 3


@dataclass(frozen=True)
class Request:
    """One request as the engine decides it: who, which model, how much."""

    user: User | None
    address: str | None
    scope: str
    rid: str
    model: str
    named_tokens: int
    add_default_output: bool
    prompt_tokens: int | None


@dataclass(frozen=True)
class Ask:
    """A request priced against one config: its tokens (with the plan's default output
    allowance when it named none), its cost, and the counters it charges."""

    config: QuotaConfig
    tokens: int
    cost: int
    price: Price | None
    limits: tuple[Limit, ...]
    charges: Charges


def reserve(
    user: User | None,
    tokens: int,
    *,
    model: str = "",
    request_id: str | None = None,
    client_address: str | None = None,
    add_default_output: bool = False,
    prompt_tokens: int | None = None,
) -> Reservation:
    """Hold ``tokens`` for one LLM call in every limit that applies, atomically.

    ``add_default_output`` adds the plan's default output allowance to ``tokens`` (for a
    request that names no ``max_tokens``); ``prompt_tokens`` (the prompt part of
    ``tokens``) prices a cost limit exactly, else every token is priced at the dearer of
    the model's input and output prices. Anonymous clients need ``client_address``.
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
    request = Request(
        user, client_address, scope, rid, model, tokens, add_default_output, prompt_tokens
    )
    started = time.perf_counter()
    try:
        reservation = _reserve(request)
    except QuotaError as exc:
        record_decision(*refusal_labels(exc), time.perf_counter() - started)
        raise
    outcome = "degraded" if reservation.degraded else "allowed"
    record_decision(outcome, "", time.perf_counter() - started)
    return reservation


def _reserve(request: Request) -> Reservation:
    try:
        ask, decision = guarded_for(request.scope, _decide, request)
    except StoreUnavailable:
        if quota_settings.FAILURE_POLICY == "closed":
            raise
        record_degraded("store_unavailable")
        return _degraded(request)
    return _outcome(request, ask, decision)


def ask_for(request: Request, config: QuotaConfig) -> Ask:
    """Price ``request`` against ``config``; ``RequestTooLarge`` when it can never fit."""
    tokens = request.named_tokens
    if request.add_default_output:
        tokens += config.limits.default_output_tokens
    price = _price(config, request.model)
    cost = _cost(price, tokens, request.prompt_tokens)
    limits = config.applicable(request.model)
    _check_fits(config, limits, tokens, cost)
    charges = charges_for(limits, request.scope, config, tokens, cost)
    return Ask(config, tokens, cost, price, limits, charges)


def _decide(request: Request) -> tuple[Ask, Decision]:
    """One decision in Redis: again with fresh limits while they turn out stale, and with
    the ledger's figures for counters Redis lost (or never had)."""
    for _ in range(STALE_RETRIES):
        config = config_for(request.user, request.address)
        try:
            ask = ask_for(request, config)
        except RequestTooLarge:
            # Decided here, not in Redis: only on limits that are still current.
            if _still_current(config):
                raise
            continue
        decision = _send(request, ask, {})
        if decision.status is DecisionStatus.NEEDS_SEED:
            team = ask.config.team.id if ask.config.team else None
            seeds = counter_seeds(request.scope, team, ask.charges.counters, decision.unbuilt)
            decision = _send(request, ask, seeds)
        if decision.status is not DecisionStatus.STALE_CONFIG:
            return ask, decision
        configs().stale(decision.version)
    raise StoreUnavailable("The limits kept changing during the decision.")


def _still_current(config: QuotaConfig) -> bool:
    """Whether ``config`` was read at the current config version (one Redis call; a stale
    config is dropped from this process's memory)."""
    version = get_store().current_version()
    if version == config.version:
        return True
    configs().stale(version)
    return False


def _send(request: Request, ask: Ask, seeds: dict) -> Decision:
    args, kwargs = reserve_arguments(request, ask, seeds)
    return get_store().reserve(*args, **kwargs)


def reserve_arguments(
    request: Request, ask: Ask, seeds: dict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What the store's ``reserve`` is sent for this request (the sync path and its async
    twin send the same)."""
    config = ask.config
    args = (request.scope, request.rid, ask.charges.counters, ask.charges.amounts)
    return args, {
        "ttl_ms": reservation_ttl_ms(),
        "version": config.version,
        "concurrency": config.limits.max_concurrent_requests or 0,
        "attempts_limit": int(quota_settings.REJECTED_PER_MINUTE or 0),
        "primary": ask.charges.primary,
        "tokens": ask.tokens,
        "cost": ask.cost,
        "team": str(config.team.id) if config.team else "",
        "names": ask.charges.names,
        "model": request.model,
        "seeds": seeds,
    }


def _outcome(request: Request, ask: Ask, decision: Decision) -> Reservation:
    counters = ask.charges.counters
    retry = decision.retry_ms / 1000 if decision.status is not DecisionStatus.ALLOWED else 0.0
    state = quota_state(counters, decision.figures, decision.now_ms, retry_after=retry)
    if decision.status is DecisionStatus.ALLOWED:
        _maybe_alert(request, ask, state)
        _check_alerts(request, ask, state, 0)
        return _reservation(request, ask, state, decision.now_ms, decision.epoch)
    if decision.status is DecisionStatus.DUPLICATE_ID:
        raise ValueError(f"Reservation {request.rid!r} already exists: ids must be unique.")
    exc = _rejection(ask, decision, state)
    if decision.status is DecisionStatus.OVER_LIMIT:
        _check_alerts(request, ask, state, decision.refusing)
    team = ask.config.team.id if ask.config.team else None
    note_refusal(user_id_of(request.user), team, request.model, exc, decision.now_ms)
    quota_exceeded.send(sender=Reservation, user=request.user, scope=request.scope, exception=exc)
    raise exc


def _reservation(
    request: Request, ask: Ask, state: QuotaState, at_ms: int, epoch: str, degraded: bool = False
) -> Reservation:
    config = ask.config
    return Reservation(
        id=request.rid,
        scope=request.scope,
        user_id=user_id_of(request.user),
        model=request.model,
        estimated_tokens=ask.tokens,
        reserved_at_ms=at_ms,
        state=state,
        epoch=epoch,
        plan_slug=config.limits.plan_slug,
        degraded=degraded,
        counters=ask.charges.counters,
        primary=ask.charges.primary,
        estimated_cost=ask.cost,
        prompt_tokens=request.prompt_tokens,
        price=ask.price,
        team=str(config.team.id) if config.team else "",
        holds_slot=bool(config.limits.max_concurrent_requests),
    )


def _rejection(ask: Ask, decision: Decision, state: QuotaState) -> QuotaExceeded:
    """The 429 of a refusal, in the units of the limit that refused."""
    retry = decision.retry_ms / 1000
    if decision.status is DecisionStatus.OVER_ATTEMPTS:
        allowed = int(quota_settings.REJECTED_PER_MINUTE)
        return QuotaExceeded(
            limit=allowed, remaining=0, requested=1, retry_after=retry, scope="attempts",
            reset_seconds=retry, state=state, window="minute",
        )  # fmt: skip
    if decision.status is DecisionStatus.OVER_CONCURRENCY:
        slots = ask.config.limits.max_concurrent_requests or 0
        return QuotaExceeded(
            limit=slots, remaining=max(slots - decision.in_flight, 0), requested=1,
            retry_after=retry, scope="concurrency", state=state,
        )  # fmt: skip
    counter = ask.charges.counters[decision.refusing - 1]
    figure = decision.figures[decision.refusing - 1]
    refused = counter.limit
    return QuotaExceeded(
        limit=refused.budget,
        remaining=max(refused.budget - figure.total, 0),
        requested=ask.charges.amounts[decision.refusing - 1],
        retry_after=retry,
        scope=refused.metric.value,
        reset_seconds=figure.reset_ms / 1000,
        state=state,
        limit_scope=refused.scope.value,
        window=refused.window.name,
        model=refused.model,
    )


def _check_fits(config: QuotaConfig, limits: tuple[Limit, ...], tokens: int, cost: int) -> None:
    """``RequestTooLarge`` for a request no waiting can let through: over a per-request cap,
    or over a whole budget of tokens or cost."""
    for cap, _origin in config.caps:
        if tokens > cap:
            raise RequestTooLarge(limit=cap, requested=tokens, reason="the per-request cap")
    for limit in limits:
        metric = limit.metric
        asked = tokens if metric is Metric.TOKENS else cost if metric is Metric.COST else 1
        if asked > limit.budget:
            raise RequestTooLarge(
                limit=limit.budget,
                requested=asked,
                reason=f"the whole budget of {limit.name}",
                scope=limit.metric.value,
                limit_scope=limit.scope.value,
                window=limit.window.name,
                model=limit.model,
            )


def _price(config: QuotaConfig, model: str) -> Price | None:
    """The model's price (``None`` with an empty price table). A model the table does not
    list is never free: it is priced at the table's highest prices, with one warning."""
    if not config.prices:
        return None
    price, listed = config.prices.price_for(model)
    if not listed:
        _warn_unpriced(model)
    return price


_warned: set[str] = set()


def _warn_unpriced(model: str) -> None:
    if model not in _warned and len(_warned) < 1000:
        _warned.add(model)
        logger.warning(
            "quotas: no price is listed for model %r: its cost is counted at the highest "
            "listed prices (add a model price in the admin)",
            model,
        )


def _cost(price: Price | None, tokens: int, prompt: int | None) -> int:
    """Micro-dollars of an estimate: its prompt at the input price, the rest at the output
    price; without the split, every token at the dearer of the two."""
    if price is None:
        return 0
    if prompt is None or prompt > tokens:
        dearer = max(price.input_per_million, price.output_per_million)
        return Price("", dearer, dearer).cost(tokens, 0)
    return price.cost(prompt, tokens - prompt)


def _maybe_alert(request: Request, ask: Ask, state: QuotaState) -> None:
    """``budget_threshold_crossed`` once, when this reservation takes the primary budget
    from below to at-or-above ``ALERT_THRESHOLD``."""
    threshold = quota_settings.ALERT_THRESHOLD
    primary = ask.charges.primary
    if not threshold or not primary:
        return
    policy = state.policies[primary - 1]
    used = policy.limit - policy.remaining
    mark = threshold * policy.limit
    if used - ask.tokens < mark <= used:
        budget_threshold_crossed.send(
            sender=Reservation,
            user=request.user,
            scope=request.scope,
            used=used,
            limit=policy.limit,
            threshold=threshold,
        )


def _check_alerts(request: Request, ask: Ask, state: QuotaState, refusing: int) -> None:
    """The ``QUOTAS["ALERTS"]`` thresholds this decision reached (``quotas.engine.alerts``)."""
    config = ask.config
    plan = config.limits.plan_slug
    check_alerts(request.scope, plan, config.team, ask, state.policies, refusing)


def _degraded(request: Request) -> Reservation:
    """Fail-open: serve without Redis, within this process's share of every limit
    (``QUOTAS["DEGRADED_SHARE"]``, counted locally: see ``quotas.engine.degraded``).
    Per-request caps and whole budgets still hold; the usage is charged to every layer once
    Redis answers again."""
    ask = ask_for(request, config_for(request.user, request.address))
    limits, window = ask.config.limits, window_spec().window_seconds
    state = QuotaState(limits.tokens_per_window, 0, 0.0, window, degraded=True)
    at_ms = now_ms()
    slots = limits.max_concurrent_requests
    concurrency = Concurrency(request.scope, slots, reservation_ttl_ms()) if slots else None
    try:
        admit_degraded(
            request.rid, ask.charges.counters, ask.charges.amounts, at_ms, state, concurrency
        )
    except QuotaExceeded as exc:
        quota_exceeded.send(
            sender=Reservation, user=request.user, scope=request.scope, exception=exc
        )
        raise
    return _reservation(request, ask, state, at_ms, DEGRADED_EPOCH, degraded=True)
