"""Settle: replace a reservation's estimate with the actual usage, in the bucket it was
charged to, and send its ledger record. Idempotent by reservation id; at once, or from a
per-process batch (``SETTLE_BATCH_SECONDS``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from quotas.conf import quota_settings
from quotas.core.bounds import check_token_figure
from quotas.core.decisions import SettleOutcome
from quotas.engine.batching import Batcher, batch_interval
from quotas.engine.counters import quota_state
from quotas.engine.degraded import settle_degraded
from quotas.engine.ledger import ledger_batcher, send_to_ledger, usage_payload
from quotas.engine.lookup import actual_cost, reservation_of
from quotas.engine.runtime import get_store, guarded, guarded_for, now_ms
from quotas.engine.types import Reservation, Settlement
from quotas.exceptions import StoreUnavailable
from quotas.signals import usage_settled
from quotas.telemetry import record_settled

__all__ = ["flush_settle_batch", "refund", "settle", "settle_charges", "settle_later"]

logger = logging.getLogger("quotas")


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
        arguments = job.store_arguments()
        result: SettleOutcome | StoreUnavailable = guarded_for(
            arguments["scope"], get_store().settle, **arguments
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


def settle_charges(
    reservation: Reservation,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    total_tokens: int | None = None,
) -> tuple[int, int]:
    """What settling ``reservation`` with these figures will charge, without settling it:
    ``(tokens, cost in micro-dollars)`` (the estimate's where no usage is given). Bad
    figures raise ``ValueError``, as ``settle`` does. ``QuotaMiddleware`` tells a response's
    headers from it when its settle runs after the response (``SETTLE_AFTER_RESPONSE``)."""
    actual = _actual_tokens(prompt_tokens, completion_tokens, total_tokens)
    cost = actual_cost(reservation, prompt_tokens, completion_tokens, actual)
    return (
        reservation.estimated_tokens if actual is None else actual,
        reservation.estimated_cost if cost is None else cost,
    )


def flush_settle_batch() -> int:
    """Send this process's waiting settles now; returns how many were sent."""
    return _settle_batcher().flush()


def flush_batches_at_exit() -> int:
    """Send this process's batches as its ``atexit`` hooks would: the settles first (their
    ledger records join the ledger batch), then the ledger records, each after the batch
    another thread is still sending. For processes that leave without running ``atexit``
    hooks (a Celery prefork pool's child); returns how many were sent."""
    sent = _settler.flush_at_exit() if _settler is not None else 0
    return sent + ledger_batcher().flush_at_exit()


@dataclass(frozen=True)
class _SettleJob:
    """A settle's validated figures, ready for the store."""

    reservation: Reservation
    actual: int | None
    status: str
    prompt: int | None
    completion: int | None
    cost: int | None = None

    def store_arguments(self) -> dict[str, Any]:
        reservation = self.reservation
        return {
            "scope": reservation.scope,
            "reservation_id": reservation.id,
            "counters": reservation.counters,
            "actual_tokens": self.actual,
            "actual_cost": self.cost,
            "epoch": reservation.epoch,
            "status": self.status,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "estimate": reservation.estimated_tokens,
            "estimated_cost": reservation.estimated_cost,
            "reserved_at_ms": reservation.reserved_at_ms,
            "model": reservation.model,
            "team": reservation.team,
            "primary": reservation.primary,
        }


def _settle_job(
    reservation_or_id: Reservation | str,
    prompt: int | None,
    completion: int | None,
    total: int | None,
    status: str,
) -> _SettleJob:
    reservation = reservation_of(reservation_or_id)
    actual = _actual_tokens(prompt, completion, total)
    cost = actual_cost(reservation, prompt, completion, actual)
    if reservation.degraded:
        # Served without Redis, so nothing was charged: the settle script charges the real
        # usage to every built counter now (its epoch never matches DEGRADED_EPOCH), or leaves
        # it to the ledger row when the window is still to be rebuilt.
        status = "degraded"
        actual = reservation.estimated_tokens if actual is None else actual
        cost = reservation.estimated_cost if cost is None else cost
        settle_degraded(reservation, actual, cost)
    return _SettleJob(reservation, actual, status, prompt, completion, cost)


def _finish_settle(
    job: _SettleJob, result: SettleOutcome | StoreUnavailable, *, on_loop: bool = False
) -> Settlement:
    """The settlement of the store's answer; sends the ledger record and the signal.
    ``on_loop``: called from an event loop, so the record must not send a batch it fills
    (see ``send_to_ledger``)."""
    reservation = job.reservation
    if isinstance(result, StoreUnavailable):
        # The ledger row is still written; the window keeps the estimate until the audit
        # task repairs it or it ages out.
        logger.warning("quotas: Redis unavailable while settling %s; ledger only", reservation.id)
        used = reservation.estimated_tokens if job.actual is None else job.actual
        cost = reservation.estimated_cost if job.cost is None else job.cost
        outcome = Settlement(
            reservation.id, reservation.estimated_tokens, used, 0, True, None, None, cost
        )
    else:
        if result.status == 1:
            # Redis knows the reservation best (settling by id alone knows nothing else).
            reservation = replace(
                reservation,
                estimated_tokens=result.estimate,
                estimated_cost=result.estimated_cost,
                reserved_at_ms=result.reserved_at_ms,
                model=reservation.model or result.model,
                team=reservation.team or result.team,
            )
        outcome = _settlement(reservation, result)
    if outcome.settled_now:
        record_settled(
            reservation.model, reservation.plan_slug, outcome.actual_tokens, outcome.cost
        )
        send_to_ledger(
            usage_payload(
                reservation,
                outcome.actual_tokens,
                job.prompt,
                job.completion,
                job.status,
                cost=outcome.cost,
            ),
            nowait=on_loop,
            # Redis took the settle: its script put the record in the outbox too.
            in_outbox=not isinstance(result, StoreUnavailable),
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


def _settlement(reservation: Reservation, result: SettleOutcome) -> Settlement:
    counters = reservation.counters
    state = None
    if counters and len(result.figures) == len(counters):
        state = quota_state(counters, result.figures, now_ms())
    return Settlement(
        reservation.id,
        reservation.estimated_tokens,
        result.actual,
        result.applied,
        result.settled_now,
        state.remaining if state else None,
        state,
        result.cost,
    )


def _settle_batch(jobs: list[_SettleJob]) -> None:
    """Send settles in one round trip and finish each (in the batcher's thread, mostly)."""
    try:
        results: list[SettleOutcome | StoreUnavailable] = guarded(
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
        ledger_batcher()
        _settler = Batcher(
            _settle_batch,
            interval=lambda: batch_interval(quota_settings.SETTLE_BATCH_SECONDS),
            size=lambda: int(quota_settings.LEDGER_BATCH_SIZE),
            name="quotas-settle-batch",
        )
    return _settler


_settler: Batcher[_SettleJob] | None = None


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
