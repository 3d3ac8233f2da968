"""The public Python API: ``reserve``, ``settle``, ``refund``, ``budget_for``, and their
async twins ``areserve``, ``asettle``, ``arefund``, ``abudget_for`` (over ``redis.asyncio``).

Host code that calls an LLM outside a view (a Celery task, a script) uses these directly::

    reservation = services.reserve(user, estimate.total, model="gpt-4o")
    response = call_llm(...)
    services.settle(reservation, prompt_tokens=..., completion_tokens=...)

In async code (an ``async def`` view, an ASGI app), await the twins: they never block the
event loop on Redis or the database (``quotas.engine.aio`` says what runs where)::

    reservation = await services.areserve(user, estimate.total, model="gpt-4o")
    ...
    await services.asettle(reservation, prompt_tokens=..., completion_tokens=...)

Steady state: one Redis round trip and no database query per ``reserve``. The user's limits
live in their window hash; a plan or quota edit drops them, and the next request reloads them.

This module is a facade: the work is done in ``quotas.engine`` (one module per concern), and
integrations (the throttle, the middleware, views, the admin, tasks) use these names only.
"""

from __future__ import annotations

from quotas.engine.aio import abudget_for, arefund, areserve, asettle
from quotas.engine.alert_delivery import DeliveryFailed, alert_text
from quotas.engine.alert_delivery import deliver_email as deliver_alert_email
from quotas.engine.alert_delivery import deliver_webhook as deliver_alert_webhook
from quotas.engine.alerts import alert_rules
from quotas.engine.attempts import block, blocked_for, record_rejected, refusal
from quotas.engine.budgets import budget_for, reset_window
from quotas.engine.config import config_changed, publish_config_changes
from quotas.engine.config import time_zone as calendar_time_zone
from quotas.engine.estimation import estimate
from quotas.engine.health import backlog_watch, health, ledger_backlog
from quotas.engine.history import PERIODS, UsageBucket, usage_history
from quotas.engine.jobs import (
    Claim,
    claim_job,
    defer_job,
    fail_job,
    finish_job,
    job_for_owner,
    job_request_id,
    requeue_job,
    requeue_later,
    sweep_jobs,
)
from quotas.engine.ladders import Ladder, ladder_for, ladder_of_plan
from quotas.engine.ledger import flush_ledger_batch, send_to_ledger, usage_payload
from quotas.engine.plans import User, forget_limits_of, limits_for, move_to_plan, scope_for
from quotas.engine.providers import (
    Admission,
    AdmitStatus,
    Outcome,
    ProviderHeaders,
    ProviderState,
    admit_call,
    forget_provider,
    observe_call,
    provider_states,
)
from quotas.engine.refusals import roll_up_refusals
from quotas.engine.reservations import reserve
from quotas.engine.responses import cache_key, cached_response, keep_response
from quotas.engine.runtime import (
    broker_state,
    get_breaker,
    get_store,
    redis_key_prefix,
    reset_runtime,
    window_spec,
)
from quotas.engine.seeding import ledger_seed
from quotas.engine.settlement import (
    flush_batches_at_exit,
    flush_settle_batch,
    refund,
    settle,
    settle_charges,
    settle_later,
)
from quotas.engine.types import DEGRADED_EPOCH, Reservation, Settlement

__all__ = [
    "DEGRADED_EPOCH",
    "PERIODS",
    "Admission",
    "AdmitStatus",
    "Claim",
    "DeliveryFailed",
    "Ladder",
    "Outcome",
    "ProviderHeaders",
    "ProviderState",
    "Reservation",
    "Settlement",
    "UsageBucket",
    "User",
    "abudget_for",
    "admit_call",
    "alert_rules",
    "alert_text",
    "arefund",
    "areserve",
    "asettle",
    "backlog_watch",
    "block",
    "blocked_for",
    "broker_state",
    "budget_for",
    "cache_key",
    "cached_response",
    "calendar_time_zone",
    "claim_job",
    "config_changed",
    "defer_job",
    "deliver_alert_email",
    "deliver_alert_webhook",
    "estimate",
    "fail_job",
    "finish_job",
    "flush_batches_at_exit",
    "flush_ledger_batch",
    "flush_settle_batch",
    "forget_limits_of",
    "forget_provider",
    "get_breaker",
    "get_store",
    "health",
    "job_for_owner",
    "job_request_id",
    "keep_response",
    "ladder_for",
    "ladder_of_plan",
    "ledger_backlog",
    "ledger_seed",
    "limits_for",
    "move_to_plan",
    "observe_call",
    "provider_states",
    "publish_config_changes",
    "record_rejected",
    "redis_key_prefix",
    "refund",
    "refusal",
    "requeue_job",
    "requeue_later",
    "reserve",
    "reset_runtime",
    "reset_window",
    "roll_up_refusals",
    "scope_for",
    "send_to_ledger",
    "settle",
    "settle_charges",
    "settle_later",
    "sweep_jobs",
    "usage_history",
    "usage_payload",
    "window_spec",
]
