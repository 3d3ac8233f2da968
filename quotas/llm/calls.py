"""One logical LLM call: its ladder of rungs and the blocking steps every rung takes (estimate,
reserve, admit, observe, settle, cache, defer), shared by the sync and async clients.

A rung is tried only when the one above refused: the user's budget for that model, the
provider's limits or its open breaker (a provider 429 too, for a call that may degrade). A
call that may not degrade has one rung, the requested model.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import openai

from quotas import services
from quotas.conf import quota_settings
from quotas.core.ratelimits import parse_provider_headers
from quotas.enforcement import reservation_of, use_reservation
from quotas.exceptions import QuotaExceeded
from quotas.llm.errors import Deferred, ProviderRefused, ProviderUnavailable, RungRefused
from quotas.llm.retries import provider_retry_after, status_of
from quotas.llm.usage import Hold, usage_figures
from quotas.telemetry import record_deferred, record_degraded

__all__ = ["CallOptions", "LogicalCall", "Rung", "request_body"]

# Keyword arguments of ``create`` that shape the HTTP call, not the request body.
TRANSPORT_ARGUMENTS = frozenset(("extra_headers", "extra_query", "extra_body", "timeout"))
PREFERRED, FALLBACK, CACHE, DEFERRED = "preferred", "fallback", "cache", "deferred"


def request_body(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of a ``create`` call (what is estimated, cached and deferred): its
    arguments and the fields of ``extra_body``."""
    body = {k: v for k, v in arguments.items() if k not in TRANSPORT_ARGUMENTS}
    extra = arguments.get("extra_body")
    return {**body, **extra} if isinstance(extra, Mapping) else body


@dataclass(frozen=True)
class CallOptions:
    """Who calls whom, and how patiently (see ``quotas.llm.wrap``)."""

    user: Any
    provider: str
    degrade: bool = False
    deadline_seconds: float | None = None
    request: Any = None
    request_id: str | None = None
    settle: bool = True


@dataclass(frozen=True)
class Rung:
    """A way to answer: ``kind`` ``"model"`` (``model``), ``"cache"`` or ``"defer"``;
    ``label`` is what the answer says served it (``preferred``, ``fallback``, ``cache``)."""

    kind: str
    label: str
    model: str = ""


class LogicalCall:
    """One ``create`` call, whatever rungs and attempts it takes."""

    def __init__(self, options: CallOptions, arguments: dict[str, Any]) -> None:
        self.options = options
        self.arguments = arguments
        self.body = request_body(arguments)
        self.model = str(arguments.get("model") or "")
        self.stream = bool(arguments.get("stream"))
        deadline = options.deadline_seconds or float(quota_settings.LLM_DEADLINE_SECONDS)
        self.deadline = time.monotonic() + deadline
        self.refusals: list[RungRefused] = []
        self.hold: Hold | None = None
        # The wrapped request's own reservation, once the requested model's rung saw it.
        self.request_reservation: Any = None

    # -- the ladder ---------------------------------------------------------------------
    def first_rung(self) -> Rung:
        return Rung("model", PREFERRED, self.model)

    def lower_rungs(self) -> list[Rung]:
        """The plan's ladder below the requested model, for a call that may degrade (reads
        the plan: only after the requested model refused)."""
        if not self.options.degrade:
            return []
        ladder = services.ladder_for(self.options.user)
        rungs = [Rung("model", FALLBACK, m) for m in ladder.fallback_models if m != self.model]
        if ladder.serve_from_cache:
            rungs.append(Rung("cache", CACHE))
        if ladder.defer_when_refused and getattr(self.options.user, "is_authenticated", False):
            rungs.append(Rung("defer", DEFERRED))  # a job has an owner to read it
        return rungs

    def rungs(self) -> Iterator[Rung]:
        """The requested model, then (a call that may degrade) the plan's ladder."""
        yield self.first_rung()
        yield from self.lower_rungs()

    def refused(self, refusal: RungRefused) -> None:
        self.refusals.append(refusal)

    def failure(self) -> BaseException:
        """What the caller gets when no rung served: the requested model's refusal."""
        return self.refusals[0].error

    def retry_after(self) -> float:
        """The earliest any refused rung said it could serve (at least 1 s)."""
        hints = [r.retry_after for r in self.refusals if r.retry_after > 0]
        return max(min(hints, default=1.0), 1.0)

    # -- time -----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def patience(self) -> float:
        """How long this call may wait for the provider before its rung counts as refused."""
        if self.options.degrade:
            return min(float(quota_settings.LLM_DEGRADE_AFTER_SECONDS), self.left())
        return self.left()

    def attempt_timeout(self) -> float:
        cap = float(quota_settings.LLM_ATTEMPT_TIMEOUT_SECONDS)
        caller = self.arguments.get("timeout")
        if isinstance(caller, int | float) and caller > 0:
            cap = min(cap, float(caller))
        return max(min(cap, self.left()), 0.05)

    # -- the user's budget ----------------------------------------------------------------
    def estimate(self, rung: Rung) -> Any:
        """The estimate of this call's body at ``rung``'s model (``InvalidRequest``: bad)."""
        return services.estimate({**self.body, "model": rung.model})

    def provider_tokens(self, rung: Rung, estimate: Any) -> int:
        """The tokens the provider's limits are asked for: the user's reservation's figure
        (the request's output limit, else the plan's default output allowance)."""
        adopted = self._request_reservation(rung)
        if adopted is not None:
            return int(adopted.estimated_tokens)
        if estimate.output_tokens is not None:
            return int(estimate.named_tokens)
        return int(
            estimate.named_tokens + services.limits_for(self.options.user).default_output_tokens
        )

    def reserve(self, rung: Rung, estimate: Any, tokens: int) -> Hold:
        """Hold the user's budget for one model rung (after the provider admitted the call,
        so a rung the provider refuses leaves no trace in the ledger); ``RungRefused`` when
        the budget refuses."""
        adopted = self._request_reservation(rung)
        if adopted is not None:
            return Hold(adopted, rung.model, tokens, estimate.prompt_tokens)
        try:
            reservation = services.reserve(
                self.options.user,
                estimate.named_tokens,
                model=rung.model,
                request_id=self.options.request_id,
                add_default_output=estimate.output_tokens is None,
                prompt_tokens=estimate.prompt_tokens,
            )
        except QuotaExceeded as exc:
            raise RungRefused(exc, exc.retry_after) from exc
        except ValueError:
            if not self.options.request_id:
                raise
            return self._adopt_by_id(rung, tokens, estimate.prompt_tokens)
        return Hold(reservation, rung.model, tokens, estimate.prompt_tokens)

    def release(self, rung: Rung, tokens: int, admission: services.Admission) -> None:
        """The provider admitted a call that will not be sent: give its share back."""
        services.observe_call(
            self.options.provider,
            rung.model,
            services.Outcome.RELEASED,
            tokens,
            admission=admission,
        )

    def _request_reservation(self, rung: Rung) -> Any:
        """The throttle's reservation of the wrapped HTTP request, for its first model call."""
        request = self.options.request
        if request is None or rung.label != PREFERRED:
            return None
        reservation = reservation_of(request)
        if reservation is None or reservation.settlements or reservation.model != rung.model:
            return None
        self.request_reservation = reservation
        return reservation

    def _adopt_by_id(self, rung: Rung, tokens: int, prompt: int) -> Hold:
        # The id is taken: an earlier run of this job (its worker died) reserved it. Its
        # reservation is this call's: settled once, by id.
        scope = services.scope_for(self.options.user)
        return Hold(f"{scope}/{self.options.request_id}", rung.model, tokens, prompt)

    # -- the provider ---------------------------------------------------------------------
    def admission_wait(
        self, admission: services.Admission, rung: Rung, tokens: int, patience: float
    ) -> float | None:
        """``None``: go. Else the seconds to wait before asking again; ``RungRefused`` when
        the wait is longer than ``patience`` or the breaker is open."""
        if admission.admitted:
            return None
        provider, wait = self.options.provider, admission.wait_seconds
        if admission.status is services.AdmitStatus.BREAKER_OPEN:
            error: Exception = ProviderUnavailable(
                provider=provider, model=rung.model, retry_after=wait
            )
            raise RungRefused(error, wait)
        if wait > patience:
            reason = admission.status.name.lower().replace("_", " ")
            error = ProviderRefused(
                provider=provider,
                model=rung.model,
                reason=reason,
                retry_after=wait,
                requested=tokens,
            )
            raise RungRefused(error, wait)
        return wait

    def observe(
        self,
        rung: Rung,
        hold: Hold,
        admission: services.Admission,
        exc: BaseException | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        """Teach every process what this attempt said; a 429 on a call that may degrade
        refuses the rung (``RungRefused``) instead of being retried."""
        outcome = _outcome(exc)
        parsed = _headers_of(exc, headers)
        services.observe_call(
            self.options.provider, rung.model, outcome, hold.tokens, admission=admission,
            headers=parsed,
        )  # fmt: skip
        if outcome is services.Outcome.LIMITED and self.options.degrade:
            wait = provider_retry_after(exc) or float(quota_settings.PROVIDER_BACKOFF_SECONDS)
            error = ProviderRefused(
                provider=self.options.provider,
                model=rung.model,
                reason="the provider's 429",
                retry_after=wait,
                requested=hold.tokens,
            )
            raise RungRefused(error, wait) from exc

    # -- answers --------------------------------------------------------------------------
    def served(self, rung: Rung, hold: Hold, answer: Any) -> Any:
        """A non-streamed answer: settle (unless the caller settles), keep it in the cache
        when the plan serves from it, say which rung served."""
        self.hold = hold
        if self.options.settle:
            hold.settle(usage_figures(getattr(answer, "usage", None)))
        self._keep(hold, answer.model_dump(exclude_unset=True))
        self.attach(hold)
        return label(answer, rung)

    def stream_ended(
        self, hold: Hold, usage: dict[str, int], text: str, cached: dict[str, Any] | None
    ) -> None:
        """A stream ended or was closed: settle with its usage, else prompt + counted text."""
        hold.settle(usage or hold.counted(text))
        if cached is not None:
            self._keep(hold, cached)

    def attach(self, hold: Hold) -> None:
        """Tell the quota middleware which reservation served the wrapped HTTP request. The
        request's own reservation (the throttle's), when this call saw it but another one
        served (a lower rung, after the provider refused the requested model before it was
        sent), is refunded: the middleware settles only the one that served."""
        reservation = hold.reservation
        request = self.options.request
        if request is None or isinstance(reservation, str):
            return
        self._refund_unused(serving=reservation)
        use_reservation(request, reservation)

    def _refund_unused(self, serving: Any = None) -> None:
        """Refund the request's own reservation when it did not serve (and is not settled)."""
        unused = self.request_reservation
        if unused is not None and unused is not serving and not unused.settlements:
            services.refund(unused)

    def _keep(self, hold: Hold, answer: dict[str, Any]) -> None:
        if isinstance(hold.reservation, str) or not answer.get("choices"):
            return
        if services.ladder_of_plan(hold.reservation.plan_slug).serve_from_cache:
            answer.pop("quota_rung", None)
            services.keep_response(self.body, answer)

    def from_cache(self) -> dict[str, Any]:
        """The cached answer to this request, charged as the plan says; ``RungRefused`` on a
        miss or when even the hit's cost does not fit."""
        answer = services.cached_response(self.body)
        if answer is None:
            raise RungRefused(self.failure(), self.retry_after())
        share = services.ladder_for(self.options.user).cache_hit_cost
        usage = answer.get("usage") or {}
        cost = math.ceil(share * int(usage.get("total_tokens") or 0))
        if cost > 0:
            self._charge_hit(cost, f"cache:{answer.get('model', '')}"[:200])
        return answer

    def _charge_hit(self, cost: int, model: str) -> None:
        try:
            reservation = services.reserve(self.options.user, cost, model=model)
        except QuotaExceeded as exc:
            raise RungRefused(exc, exc.retry_after) from exc
        services.settle(reservation, total_tokens=cost)
        self.attach(Hold(reservation, model, cost, 0))

    def note_served(self, rung: Rung) -> None:
        """Count an answer served by a lower rung of the ladder (``quotas_degraded_requests``)."""
        if rung.label != PREFERRED:
            record_degraded(rung.label)

    def defer(self) -> Deferred:
        """Queue the request as a job (which reserves and settles when it runs: the
        request's own reservation is refunded); the ``Deferred`` to raise."""
        self._refund_unused()
        retry_after = self.retry_after()
        job = services.defer_job(self.options.user, self.options.provider, self.body, retry_after)
        record_degraded(DEFERRED)
        record_deferred()
        return Deferred(job_id=str(job.pk), retry_after=retry_after)

    def sdk_arguments(self, rung: Rung) -> dict[str, Any]:
        """``create``'s arguments for one attempt at ``rung``'s model (streams ask for the
        usage chunk: the settle needs it)."""
        arguments = {**self.arguments, "model": rung.model, "timeout": self.attempt_timeout()}
        if self.stream:
            options = dict(arguments.get("stream_options") or {})
            arguments["stream_options"] = {**options, "include_usage": True}
        return arguments

    def wants_usage_chunk(self) -> bool:
        """Whether the caller asked for the usage chunk itself (else it is kept from it)."""
        options = self.arguments.get("stream_options") or {}
        return bool(isinstance(options, dict) and options.get("include_usage"))


def label(answer: Any, rung: Rung) -> Any:
    """Mark an answer (a ``ChatCompletion`` or a stream) with the rung that served it."""
    with contextlib.suppress(AttributeError, TypeError, ValueError):  # an object without a dict
        answer.quota_rung = rung.label
    return answer


def _headers_of(exc: BaseException | None, headers: Mapping[str, str] | None) -> Any:
    """The provider's figures from an answer's headers, or from an error's response."""
    if exc is not None and headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return services.ProviderHeaders()
    return parse_provider_headers({k.lower(): v for k, v in headers.items()})


def _outcome(exc: BaseException | None) -> services.Outcome:
    if exc is None:
        return services.Outcome.OK
    status = status_of(exc)
    if status == 429:
        return services.Outcome.LIMITED
    if status is not None:
        return (
            services.Outcome.FAILED if status >= 500 or status == 408 else services.Outcome.ANSWERED
        )
    if isinstance(exc, openai.APIConnectionError):
        return services.Outcome.FAILED
    return services.Outcome.RELEASED


def with_options(options: CallOptions, **changes: Any) -> CallOptions:
    """``options`` with the per-call ``degrade`` / ``deadline`` given (``None``: unchanged)."""
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(options, **given)
