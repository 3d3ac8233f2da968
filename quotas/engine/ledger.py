"""The ledger's way in: usage records on their way from a settle to their rows.

Each settle sends its record to the Celery worker (``quotas.tasks.record_usage``), in this
process's next batch (``LEDGER_BATCH_SECONDS``), or alone after the transaction commits when
batching is off. The worker writes the rows (``quotas.engine.rows``). While the broker is
down (its own circuit breaker is open), rows are written directly, so no usage is lost; the
settle also put the record in the Redis outbox, which ``flush_ledger`` writes when a batch
never arrives.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from quotas.conf import quota_settings
from quotas.engine import dispatch
from quotas.engine.batching import Batcher, batch_interval
from quotas.engine.health import backlog_watch
from quotas.engine.rows import write_usage
from quotas.engine.runtime import broker_breaker, note_broker_seen, now_ms
from quotas.engine.types import Reservation

__all__ = ["flush_ledger_batch", "ledger_batcher", "send_to_ledger", "usage_payload"]

logger = logging.getLogger("quotas")


def usage_payload(
    reservation: Reservation,
    actual: int,
    prompt: int | None,
    completion: int | None,
    status: str,
    *,
    cost: int | None = None,
) -> dict[str, Any]:
    """The primitives a ledger row is made from (what the Celery task receives); ``cost``
    (micro-dollars) defaults to the estimated cost."""
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
        "settled_at_ms": now_ms(),
        "team": reservation.team,
        "estimated_cost": reservation.estimated_cost,
        "cost": reservation.estimated_cost if cost is None else cost,
    }


def send_to_ledger(
    payload: dict[str, Any], *, nowait: bool = False, in_outbox: bool = False
) -> None:
    """Send a ledger record to the Celery worker: in this process's next batch (every
    ``LEDGER_BATCH_SECONDS``), or alone after the current transaction commits when that is 0.
    Rows are written directly when the broker cannot take the task, so no usage is lost.
    ``nowait`` (batching on only): a batch this record fills is sent by the batch's own
    thread, never by the caller's (an event loop's). ``in_outbox``: the settle script also
    put this record in the user's Redis outbox, so it may wait for the batch's next tick; a
    record only this process holds (made while Redis was unreachable) wakes the batch's
    thread to send it at once, so a process killed later does not take it along."""
    backlog_watch().start()  # no Redis call: a flag check once its thread runs
    if quota_settings.LEDGER_BATCH_SECONDS > 0:
        if nowait:
            ledger_batcher().add_nowait(payload, urgent=not in_outbox)
        else:
            ledger_batcher().add(payload, urgent=not in_outbox)
    else:
        transaction.on_commit(lambda: _enqueue_or_write([payload]))


def flush_ledger_batch() -> int:
    """Send this process's waiting ledger records now; returns how many were sent."""
    return ledger_batcher().flush()


def ledger_batcher() -> Batcher[dict[str, Any]]:
    # One per process for its whole life (it outlives settings changes: it reads them live).
    global _batcher
    if _batcher is None:
        _batcher = Batcher(
            _enqueue_or_write,
            interval=lambda: batch_interval(quota_settings.LEDGER_BATCH_SECONDS),
            size=lambda: int(quota_settings.LEDGER_BATCH_SIZE),
        )
    return _batcher


_batcher: Batcher[dict[str, Any]] | None = None


def _enqueue_or_write(payloads: list[dict[str, Any]]) -> None:
    # A dead broker costs one failed publish (up to its socket timeout) per probe period,
    # not one per batch: while its breaker is open, rows are written directly.
    breaker = broker_breaker()
    if breaker.allow():
        try:
            # Celery would otherwise build the log's repr of the records (``saferepr``): about
            # half the cost of a publish, and the users' usage figures in the worker's log.
            dispatch.send(dispatch.RECORD_USAGE, payloads, argsrepr=_records_repr(payloads))
        except Exception:  # no broker, or it refused: write the rows ourselves
            breaker.record_failure()
            logger.warning(
                "quotas: broker unavailable; writing %d usage records directly", len(payloads)
            )
        else:
            breaker.record_success()
            note_broker_seen()
            return
    write_usage(payloads)


def _records_repr(payloads: list[dict[str, Any]]) -> str:
    """What the worker's log shows of a ``record_usage`` task's records."""
    ids = [str(payload.get("request_id", "?")) for payload in payloads[:3]]
    more = f", ... {len(payloads) - len(ids)} more" if len(payloads) > len(ids) else ""
    return f"[{len(payloads)} usage records: {', '.join(ids)}{more}]"
