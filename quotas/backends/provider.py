"""What every process knows of a provider: its learned limits, the adaptive rate and the
circuit breaker of each provider key and model, in one Redis hash each. Framework-free.

Two scripts (``provider_admit.lua``, ``provider_observe.lua``), one round trip each: before a
call (may it go now?) and after it (what did the provider say?). Every Redis error is raised
as ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any
from urllib.parse import quote, unquote

from redis.exceptions import RedisError

from quotas.backends.records import as_text
from quotas.backends.scripts import ScriptRunner
from quotas.core.ratelimits import ProviderHeaders
from quotas.exceptions import StoreUnavailable

__all__ = [
    "Admission",
    "AdmitStatus",
    "Outcome",
    "ProviderState",
    "ProviderStore",
    "ProviderTuning",
]


class AdmitStatus(IntEnum):
    """Why a call may or may not go to the provider now (see ``provider_admit.lua``)."""

    ADMITTED = 1
    BACKING_OFF = 2
    BREAKER_OPEN = 3
    PROBING = 4
    NO_REQUESTS_LEFT = 5
    NO_TOKENS_LEFT = 6
    RATE = 7


class Outcome(StrEnum):
    """How a call to the provider ended, as ``provider_observe.lua`` learns from it."""

    OK = "ok"
    LIMITED = "limited"
    FAILED = "failed"
    ANSWERED = "answered"
    RELEASED = "released"


@dataclass(frozen=True)
class Admission:
    """The answer of ``admit``: go (``probe``: this call goes first, alone), or wait."""

    status: AdmitStatus
    wait_seconds: float = 0.0
    probe: bool = False
    admitted_at_ms: int = 0  # Redis's clock when asked: observe learns windows by it

    @property
    def admitted(self) -> bool:
        return self.status is AdmitStatus.ADMITTED


@dataclass(frozen=True)
class ProviderTuning:
    """The knobs of the breaker and the adaptive rate (milliseconds, calls per second)."""

    breaker_failures: int = 3
    breaker_open_ms: int = 10_000
    decrease: float = 0.5
    recovery: float = 0.05
    min_rate: float = 0.2
    backoff_ms: int = 1000
    probe_ms: int = 30_000
    ttl_ms: int = 86_400_000


@dataclass(frozen=True)
class ProviderState:
    """One provider key and model as every process sees it (for the staff endpoint)."""

    provider: str
    model: str
    mode: str
    adaptive_rate: float | None
    rate_before_cut: float | None
    backoff_seconds: float
    requests: dict[str, Any] | None
    tokens: dict[str, Any] | None
    in_flight: int
    breaker: dict[str, Any]
    answers: int
    rate_limited: int


BREAKER_STATES = {0: "closed", 1: "open", 2: "half-open"}


class ProviderStore:
    """The shared view of providers, under ``<prefix>:provider:{<provider>|<model>}``."""

    def __init__(self, client: Any, *, prefix: str, scripts: ScriptRunner | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.scripts = scripts or ScriptRunner(client)

    def key(self, provider: str, model: str) -> str:
        """The hash of one provider key and model (its own cluster slot)."""
        return f"{self.prefix}:provider:{{{quote(provider, safe='')}|{quote(model, safe='')}}}"

    @property
    def registry(self) -> str:
        return f"{self.prefix}:providers"

    def admit(
        self, provider: str, model: str, tokens: int, tuning: ProviderTuning, now_ms: Any = None
    ) -> Admission:
        """May a call of ``tokens`` (estimated) go now? Admitting draws on the learned budgets."""
        args = [_now(now_ms), int(tokens), tuning.probe_ms]
        key = self.key(provider, model)
        status, wait_ms, probe, now = self.scripts.run("provider_admit", [key], args)
        wait = max(int(wait_ms), 0) / 1000
        return Admission(AdmitStatus(int(status)), wait, bool(int(probe)), int(now))

    def observe(
        self,
        provider: str,
        model: str,
        outcome: Outcome,
        tokens: int,
        *,
        probe: bool,
        headers: ProviderHeaders,
        tuning: ProviderTuning,
        admitted_at_ms: int = 0,
        now_ms: Any = None,
    ) -> None:
        """Learn from one call's end (``RELEASED``: it was admitted but never sent);
        ``admitted_at_ms`` is its admission's ``admitted_at_ms``."""
        args = [
            _now(now_ms),
            outcome.value,
            int(tokens),
            "1" if probe else "0",
            *headers.figures(),
            tuning.breaker_failures,
            tuning.breaker_open_ms,
            repr(float(tuning.decrease)),
            repr(float(tuning.recovery)),
            repr(float(tuning.min_rate)),
            tuning.backoff_ms,
            tuning.ttl_ms,
            int(admitted_at_ms),
        ]
        keys = [self.key(provider, model), self.registry]
        self.scripts.run("provider_observe", keys, args)

    def states(self) -> list[ProviderState]:
        """Every provider key and model seen (in the last day), as of Redis's clock now."""
        try:
            keys = sorted(as_text(k) for k in self.client.smembers(self.registry))
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            for key in keys:
                pipe.hgetall(key)
            now_reply, *hashes = pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc
        now = int(now_reply[0]) * 1000 + int(now_reply[1]) // 1000
        return [
            _state(key, _decoded(fields), now)
            for key, fields in zip(keys, hashes, strict=True)
            if fields
        ]

    def forget(self, provider: str, model: str) -> None:
        """Drop what was learned of one provider key and model."""
        try:
            self.client.delete(self.key(provider, model))
            self.client.srem(self.registry, self.key(provider, model))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc


def _now(now_ms: Any) -> str:
    return "" if now_ms is None else str(int(now_ms))


def _decoded(fields: dict[Any, Any]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in fields.items()}


def _names(key: str) -> tuple[str, str]:
    tag = key[key.index("{") + 1 : key.rindex("}")]
    provider, _, model = tag.partition("|")
    return unquote(provider), unquote(model)


def _number(fields: dict[str, str], name: str) -> float | None:
    value = fields.get(name)
    return None if value is None else float(value)


def _budget(fields: dict[str, str], names: Sequence[str], now: int) -> dict[str, Any] | None:
    limit, left, reset = (_number(fields, name) for name in names)
    if left is None or reset is None:
        return None
    if reset <= now and limit is not None:
        left = limit  # the provider's window ended: full again (until an answer says more)
    return {
        "limit": None if limit is None else int(limit),
        "remaining": max(int(left), 0),
        "reset_seconds": max(reset - now, 0) / 1000,
    }


def _state(key: str, fields: dict[str, str], now: int) -> ProviderState:
    provider, model = _names(key)
    rate = _number(fields, "rate") or 0.0
    backoff = max((_number(fields, "bu") or 0) - now, 0) / 1000
    breaker = int(_number(fields, "bs") or 0)
    mode = "backing off" if backoff > 0 else "throttled" if rate > 0 else "normal"
    return ProviderState(
        provider=provider,
        model=model,
        mode=mode,
        adaptive_rate=rate or None,
        rate_before_cut=(_number(fields, "ceil") or None) if rate else None,
        backoff_seconds=backoff,
        requests=_budget(fields, ("rl", "rr", "rt"), now),
        tokens=_budget(fields, ("tl", "tr", "tt"), now),
        in_flight=int(_number(fields, "fi") or 0),
        breaker={
            "state": BREAKER_STATES.get(breaker, "closed"),
            "failures": int(_number(fields, "bf") or 0),
            "retry_after": max((_number(fields, "bo") or 0) - now, 0) / 1000
            if breaker == 1
            else 0.0,
        },
        answers=int(_number(fields, "nok") or 0),
        rate_limited=int(_number(fields, "n429") or 0),
    )
