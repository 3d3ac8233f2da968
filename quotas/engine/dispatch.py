"""The engine's seam to the task queue.

The engine asks for work to be queued by name (``RECORD_USAGE``, ``AUDIT_WINDOW``); the
integration layer says how: ``quotas.tasks`` registers its Celery tasks here when it is
imported, which ``AppConfig.ready()`` does. So the engine never imports Celery or the tasks
module, and a test (or a host without Celery) can register senders of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "ALERT_EMAIL",
    "ALERT_WEBHOOK",
    "AUDIT_WINDOW",
    "RECORD_USAGE",
    "RUN_JOB",
    "NoSender",
    "register",
    "send",
]

# Write the ledger rows of a batch of usage records: ``send(RECORD_USAGE, payloads)``.
RECORD_USAGE = "record_usage"
# Audit one rebuilt window against the ledger later: ``send(AUDIT_WINDOW, scope, countdown=s)``.
AUDIT_WINDOW = "audit_window"
# Run one deferred LLM job when it may: ``send(RUN_JOB, job_id, countdown=s)``.
RUN_JOB = "run_job"
# Deliver one budget alert: ``send(ALERT_WEBHOOK, rule_name, payload)`` (and ALERT_EMAIL).
ALERT_WEBHOOK = "alert_webhook"
ALERT_EMAIL = "alert_email"

Sender = Callable[..., Any]
_senders: dict[str, Sender] = {}


class NoSender(RuntimeError):
    """No task queue took this kind of work (``quotas.tasks`` was never imported)."""


def register(name: str, sender: Sender) -> None:
    """Queue ``name`` work with ``sender(*args, **options)`` from now on."""
    _senders[name] = sender


def send(name: str, *args: Any, **options: Any) -> None:
    """Queue one piece of ``name`` work; raises ``NoSender`` when nothing can take it, or
    whatever the sender raises (the broker is down)."""
    sender = _senders.get(name)
    if sender is None:
        raise NoSender(f"No task queue is registered for {name!r}.")
    sender(*args, **options)
