"""Celery tasks: thin, idempotent wrappers over ``quotas.services`` and ``quotas.ledger``.

Every task is safe to run twice (``acks_late``: a worker that dies mid-task gets its message
re-delivered), so retries and re-deliveries never count usage twice. A host schedules
``flush_ledger`` (e.g. every 5 s: it sets how fresh the ledger is) and ``audit_windows`` (e.g.
every 5 min) with Celery beat. ``record_usage`` is queued by ``services.settle``, one task per
batch of records (``LEDGER_BATCH_SECONDS``); the settle also puts each record in the Redis
outbox, so ``flush_ledger`` writes the rows of a batch that was never sent. A prefork pool's
child leaves with ``os._exit`` (no ``atexit`` hook runs), so the batches its tasks filled are
sent when Celery tells it to shut down (``worker_process_shutdown``).

A dead broker must not slow requests down either: batches are published with
``retry=False``, and the rows are written directly when publishing fails. Give the broker
short socket timeouts and ``"max_retries": 0`` in ``CELERY_BROKER_TRANSPORT_OPTIONS``, or
kombu keeps reconnecting for up to ``CELERY_BROKER_CONNECTION_TIMEOUT`` on every publish.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_process_shutdown
from django.db import DatabaseError

from quotas import ledger, services
from quotas.engine import dispatch
from quotas.exceptions import StoreUnavailable
from quotas.llm.jobs import run_deferred_job

__all__ = [
    "audit_window_task",
    "audit_windows_task",
    "flush_ledger_task",
    "prune_ledger_task",
    "rebuild_windows_task",
    "record_usage_task",
    "roll_up_refusals_task",
    "run_deferred_job_task",
    "send_alert_email_task",
    "send_alert_webhook_task",
    "sweep_jobs_task",
]

# A budget alert is retried with exponential backoff (1 s, 2 s, 4 s ... at most 10 min
# apart, jittered) for about an hour; a receiver that is down longer misses it.
ALERT_DELIVERY = {
    "acks_late": True,
    "autoretry_for": (OSError,),
    "retry_backoff": True,
    "retry_backoff_max": 600,
    "retry_jitter": True,
    "max_retries": 12,
    "ignore_result": True,
}

# Periodic tasks retry a few times only: the next beat tick runs them again anyway.
PERIODIC = {
    "acks_late": True,
    "autoretry_for": (StoreUnavailable, DatabaseError),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": 3,
    "ignore_result": True,
}


@shared_task(
    name="quotas.tasks.record_usage",
    acks_late=True,
    # Only a database outage raises (a record the database refuses is repaired or set aside,
    # never retried): retry for about a day, then the outbox sweep still has every record.
    autoretry_for=(DatabaseError,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=300,
)
def record_usage_task(payloads: list[dict[str, Any]] | dict[str, Any]) -> int:
    """Write the ledger rows of a batch of usage records (or of one); returns the rows
    created. A re-delivered batch changes nothing; one bad record never fails the others."""
    return ledger.write_usage([payloads] if isinstance(payloads, dict) else payloads)


@shared_task(name="quotas.tasks.flush_ledger", **PERIODIC)
def flush_ledger_task() -> int:
    """Write the ledger rows waiting in the Redis outbox (settled requests, and reservations
    never settled within their TTL, charged at their estimate); returns the rows created.
    First publishes a limits change Redis was not told of (``publish_config_changes``)."""
    services.publish_config_changes()
    return ledger.flush_ledger()


@shared_task(name="quotas.tasks.prune_ledger", **PERIODIC)
def prune_ledger_task() -> int:
    """Delete ledger rows older than ``LEDGER_RETENTION_DAYS`` in batches (their hourly
    rollups stay); returns how many. Does nothing when retention is off (the default)."""
    return ledger.prune_ledger()


@shared_task(name="quotas.tasks.roll_up_refusals", **PERIODIC)
def roll_up_refusals_task() -> int:
    """Copy the last two hours' refusal counts (429s per user, model and limit) from Redis
    into the usage rollups; returns the buckets written. Idempotent (counts are set)."""
    return services.roll_up_refusals()


@shared_task(name="quotas.tasks.audit_windows", **PERIODIC)
def audit_windows_task() -> dict[str, int]:
    """Repair drift between the Redis windows and the ledger."""
    outcomes = ledger.audit_windows()
    return {
        "windows": len(outcomes),
        "replayed": sum(o.replayed for o in outcomes),
        "adjusted": sum(o.adjusted for o in outcomes),
    }


@shared_task(name="quotas.tasks.audit_window", **PERIODIC)
def audit_window_task(scope: str) -> int:
    """Repair one window against the ledger (scheduled after a rebuild); returns tokens moved."""
    return ledger.audit_window(scope).adjusted


@shared_task(name="quotas.tasks.rebuild_windows", **PERIODIC)
def rebuild_windows_task(user_ids: list[int] | None = None) -> int:
    """Seed lost windows from the ledger now (all recent users, or these user ids)."""
    return len(ledger.rebuild_windows(user_ids))


@shared_task(
    name="quotas.tasks.run_deferred_job",
    acks_late=True,
    # A worker killed mid-job: the message comes back (acks_late) and the job's lease and
    # its own reservation id keep the re-run from calling or charging twice.
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_deferred_job_task(job_id: str) -> str:
    """Run one deferred LLM job if it is due (else it is queued again for when it may)."""
    return run_deferred_job(job_id)


@shared_task(name="quotas.tasks.sweep_jobs", **PERIODIC)
def sweep_jobs_task() -> int:
    """Queue again deferred jobs whose message was lost; expire the ones past their time."""
    return services.sweep_jobs()


@shared_task(name="quotas.tasks.send_alert_webhook", **ALERT_DELIVERY)
def send_alert_webhook_task(rule_name: str, payload: dict[str, Any]) -> int:
    """POST one budget alert to its rule's webhook, signed (``quotas.core.alerts``)."""
    return services.deliver_alert_webhook(rule_name, payload)


@shared_task(name="quotas.tasks.send_alert_email", **ALERT_DELIVERY)
def send_alert_email_task(rule_name: str, payload: dict[str, Any]) -> int:
    """Mail one budget alert to its rule's addresses."""
    return services.deliver_alert_email(rule_name, payload)


def _send_alert(task: Any) -> Any:
    def send(rule_name: str, payload: dict[str, Any]) -> None:
        task.apply_async(args=[rule_name, payload], retry=False)

    return send


def _send_usage(payloads: list[dict[str, Any]], *, argsrepr: str = "") -> None:
    # Celery would otherwise build the log's repr of the records (``saferepr``): about half
    # the cost of a publish, and the users' usage figures in the worker's log.
    record_usage_task.apply_async(
        args=[payloads], retry=False, argsrepr=argsrepr or None, kwargsrepr="{}"
    )


def _send_audit(scope: str, *, countdown: float = 0) -> None:
    audit_window_task.apply_async(args=[scope], countdown=countdown, retry=False)


def _send_job(job_id: str, *, countdown: float = 0) -> None:
    if countdown > 0 and run_deferred_job_task.app.conf.task_always_eager:
        # An eager "queue" runs the task now, and a job that is not due would be queued
        # again at once, for ever: it is left to sweep_jobs, which runs it when it is due.
        return
    run_deferred_job_task.apply_async(args=[job_id], countdown=countdown, retry=False)


# The engine queues its work by name through this seam (imported by AppConfig.ready()).
dispatch.register(dispatch.RECORD_USAGE, _send_usage)
dispatch.register(dispatch.AUDIT_WINDOW, _send_audit)
dispatch.register(dispatch.RUN_JOB, _send_job)
dispatch.register(dispatch.ALERT_WEBHOOK, _send_alert(send_alert_webhook_task))
dispatch.register(dispatch.ALERT_EMAIL, _send_alert(send_alert_email_task))


@worker_process_shutdown.connect
def _send_batches_at_shutdown(**kwargs: Any) -> None:
    """A prefork child's exit skips the ``atexit`` hook that sends what its tasks' settles
    left in this process's batches (records made while Redis was down have no outbox copy):
    send them here. Other pools exit normally and run the hook."""
    services.flush_batches_at_exit()
