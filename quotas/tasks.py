"""Celery tasks: thin, idempotent wrappers over ``quotas.services`` (safe with ``acks_late``).

A host schedules ``expire_reservations`` (e.g. every 30 s) and ``audit_windows`` (e.g. every
5 min) with Celery beat; ``record_usage_task`` is queued by ``services.settle``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from quotas import services

__all__ = ["record_usage_task"]


@shared_task(
    name="quotas.tasks.record_usage",
    acks_late=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=None,
)
def record_usage_task(payload: dict[str, Any]) -> bool:
    """Write one usage ledger row; a re-delivered payload changes nothing."""
    return services.record_usage(payload)
