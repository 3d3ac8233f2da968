"""Running a deferred job in the Celery worker (``quotas.tasks.run_deferred_job``).

The job's request goes through the same client, with the job's own reservation id (the
same on every run: a run that finds it taken settles that reservation instead of making a
second one) and without a ladder (the job *is* the ladder's last rung). Not now (the user's
budget, the provider): the job is queued again for when they said. Answered: the answer is
saved, then the reservation settled (see ``quotas.engine.jobs``).
"""

from __future__ import annotations

import logging
from typing import Any

import openai

from quotas import services
from quotas.conf import quota_settings
from quotas.exceptions import QuotaError, QuotaExceeded
from quotas.llm.calls import CallOptions
from quotas.llm.client import QuotaClient
from quotas.llm.clients import client_for
from quotas.llm.errors import ProviderUnavailable
from quotas.llm.retries import is_retryable, provider_retry_after
from quotas.llm.usage import usage_figures

__all__ = ["run_deferred_job"]

logger = logging.getLogger("quotas")


def run_deferred_job(job_id: str) -> str:
    """Run one job if it is due and nobody else runs it; returns what happened."""
    # Longer than any run can take (the deadline bounds the call, retries and waits).
    lease = float(quota_settings.LLM_DEADLINE_SECONDS) + 5
    claim = services.claim_job(job_id, lease)
    if claim.job is None:
        if not claim.done:  # another worker holds it: look again when its lease ends
            services.requeue_later(job_id, claim.wait)
        return "done" if claim.done else "busy"
    job = claim.job
    if job.result is not None:  # answered before its worker died: only the charge is left
        services.settle(_reservation_id(job), **(job.usage or {}))
        return "settled"
    return _run(job)


def _run(job: Any) -> str:
    options = CallOptions(
        user=job.user, provider=job.provider, request_id=services.job_request_id(job)
    )
    client = QuotaClient(client_for(job.provider), options)
    # A job is answered whole, streamed or not when it was asked (its owner reads it later).
    request = {k: v for k, v in job.request.items() if k not in ("stream", "stream_options")}
    try:
        answer, hold = client.complete_unsettled(request)
    except (QuotaExceeded, ProviderUnavailable) as exc:
        services.requeue_job(job, max(float(exc.retry_after), 1.0))
        return "requeued"
    except openai.APIError as exc:
        if is_retryable(exc):  # the deadline ran out on a throttled or failing provider
            services.requeue_job(job, max(provider_retry_after(exc), 5.0))
            return "requeued"
        services.fail_job(job, str(exc))
        return "failed"
    except (QuotaError, ValueError) as exc:  # can never run: no plan, too large, bad body
        services.fail_job(job, str(exc))
        return "failed"
    usage = usage_figures(getattr(answer, "usage", None))
    services.finish_job(job, answer.model_dump(), answer.model, usage)
    hold.settle(usage)
    return "succeeded"


def _reservation_id(job: Any) -> str:
    return f"{services.scope_for(job.user)}/{services.job_request_id(job)}"
