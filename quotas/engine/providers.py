"""The provider side's shared state: may a call go to a provider's model now, and what did
its answer teach every process (``quotas.backends.provider``).

The circuit breaker per provider and model lives in Redis with the rest, so a provider that
stopped answering costs one process's timeouts, not every process's. While Redis itself is
unavailable the learned limits cannot be read: calls go (the user's quota decides, under its
failure policy) and a per-process ``CircuitBreaker`` of the same semantics stands in for the
shared one.
"""

from __future__ import annotations

import contextlib
import threading

from quotas.backends.provider import (
    Admission,
    AdmitStatus,
    Outcome,
    ProviderState,
    ProviderStore,
    ProviderTuning,
)
from quotas.conf import quota_settings
from quotas.core.breaker import CircuitBreaker
from quotas.core.ratelimits import ProviderHeaders
from quotas.engine.runtime import get_store, guarded, per_process, redis_key_prefix
from quotas.exceptions import StoreUnavailable

__all__ = [
    "Admission",
    "AdmitStatus",
    "Outcome",
    "ProviderHeaders",
    "ProviderState",
    "admit_call",
    "forget_provider",
    "observe_call",
    "provider_states",
]

_fallback_lock = threading.Lock()


def provider_store() -> ProviderStore:
    """The process's provider store, on the quota store's connection and key prefix."""

    def make() -> ProviderStore:
        store = get_store()
        return ProviderStore(store.client, prefix=redis_key_prefix(), scripts=store.scripts)

    return per_process("provider_store", make)


def provider_tuning() -> ProviderTuning:
    """The breaker and adaptive-rate knobs from the settings."""
    return per_process(
        "provider_tuning",
        lambda: ProviderTuning(
            breaker_failures=int(quota_settings.PROVIDER_BREAKER_FAILURES),
            breaker_open_ms=round(quota_settings.PROVIDER_BREAKER_RESET_SECONDS * 1000),
            decrease=float(quota_settings.PROVIDER_RATE_DECREASE),
            recovery=float(quota_settings.PROVIDER_RATE_RECOVERY),
            min_rate=float(quota_settings.PROVIDER_MIN_RATE),
            backoff_ms=round(quota_settings.PROVIDER_BACKOFF_SECONDS * 1000),
            probe_ms=round(quota_settings.LLM_ATTEMPT_TIMEOUT_SECONDS * 1000) + 1000,
        ),
    )


def admit_call(provider: str, model: str, tokens: int) -> Admission:
    """May a call of ``tokens`` (estimated) go to ``provider``'s ``model`` now? If admitted,
    ``observe_call`` must follow, exactly once (``Outcome.RELEASED`` if it was never sent)."""
    try:
        return guarded(provider_store().admit, provider, model, tokens, provider_tuning())  # type: ignore[no-any-return]
    except StoreUnavailable:
        breaker = _fallback_breaker(provider, model)
        if breaker.allow():
            return Admission(AdmitStatus.ADMITTED)
        return Admission(AdmitStatus.BREAKER_OPEN, breaker.retry_after())


def observe_call(
    provider: str,
    model: str,
    outcome: Outcome,
    tokens: int,
    *,
    admission: Admission | None = None,
    headers: ProviderHeaders | None = None,
) -> None:
    """Teach every process what one admitted call's end said about the provider
    (``admission``: what ``admit_call`` answered for it)."""
    _feed_fallback(provider, model, outcome)
    # Redis unavailable: the per-process breaker above has it; the learned limits wait.
    with contextlib.suppress(StoreUnavailable):
        guarded(
            provider_store().observe,
            provider,
            model,
            outcome,
            tokens,
            probe=admission.probe if admission else False,
            admitted_at_ms=admission.admitted_at_ms if admission else 0,
            headers=headers or ProviderHeaders(),
            tuning=provider_tuning(),
        )


def provider_states() -> list[ProviderState]:
    """Every provider key and model the app has called lately, as every process sees it;
    ``StoreUnavailable`` when Redis cannot be reached."""
    return guarded(provider_store().states)  # type: ignore[no-any-return]


def forget_provider(provider: str, model: str) -> None:
    """Drop what was learned of one provider key and model (a new key, a test)."""
    guarded(provider_store().forget, provider, model)


def _fallback_breaker(provider: str, model: str) -> CircuitBreaker:
    breakers: dict[tuple[str, str], CircuitBreaker] = per_process("provider_breakers", dict)
    with _fallback_lock:
        breaker = breakers.get((provider, model))
        if breaker is None:
            breaker = breakers[(provider, model)] = CircuitBreaker(
                failures=int(quota_settings.PROVIDER_BREAKER_FAILURES),
                reset_after=float(quota_settings.PROVIDER_BREAKER_RESET_SECONDS),
            )
    return breaker


def _feed_fallback(provider: str, model: str, outcome: Outcome) -> None:
    if outcome is Outcome.RELEASED:
        return
    breaker = _fallback_breaker(provider, model)
    if outcome is Outcome.FAILED:
        breaker.record_failure()
    else:
        breaker.record_success()
