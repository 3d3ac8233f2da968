"""Deferred jobs: the last rung of a degradation ladder. A job is a row (``DeferredJob``) and
a task queued through ``quotas.engine.dispatch`` (``RUN_JOB``); the worker runs it when the
user's budget and the provider allow (``quotas.llm.jobs``), exactly once:

- a worker *claims* a job before calling anything: one row update that succeeds for one
  worker at a time, with a lease (a worker killed mid-job leaves its lease to run out, then a
  re-delivered message claims the job again);
- the answer is saved before the user is charged for it, and the charge (settling the job's
  own reservation id) is idempotent: a job whose worker died after saving is only settled;
- a job that is done (succeeded, failed, expired) is never run again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from quotas.conf import quota_settings
from quotas.engine import dispatch
from quotas.engine.plans import User
from quotas.models import DeferredJob

__all__ = [
    "Claim",
    "claim_job",
    "defer_job",
    "fail_job",
    "finish_job",
    "job_for_owner",
    "job_request_id",
    "requeue_job",
    "requeue_later",
    "sweep_jobs",
]

logger = logging.getLogger("quotas")
Status = DeferredJob.Status
DONE = (Status.SUCCEEDED, Status.FAILED, Status.EXPIRED)


def defer_job(
    user: User, provider: str, request: dict[str, Any], retry_after: float
) -> DeferredJob:
    """Save a job for ``request`` and queue it to run in ``retry_after`` seconds (after the
    surrounding transaction commits)."""
    now = timezone.now()
    job = DeferredJob.objects.create(
        user=user,
        provider=provider,
        request=request,
        run_after=now + timedelta(seconds=retry_after),
        expires_at=now + timedelta(seconds=quota_settings.DEFERRED_JOB_TTL_SECONDS),
    )
    job_id = str(job.id)
    transaction.on_commit(lambda: _queue(job_id, retry_after))
    return job


def job_request_id(job: DeferredJob) -> str:
    """The request id of the job's one reservation (the same on every run of it)."""
    return f"job-{job.id}"


@dataclass(frozen=True)
class Claim:
    """What claiming a job gave: the job to run (``job``), or why not: ``done`` (nothing left
    to do) or ``busy`` (another worker holds its lease for ``wait`` more seconds)."""

    job: DeferredJob | None
    done: bool = False
    wait: float = 0.0


def claim_job(job_id: str, lease_seconds: float) -> Claim:
    """Take a job for one run: queued, or running with a lease that ran out (its worker died).
    An expired job is marked so and not run."""
    now = timezone.now()
    with transaction.atomic():
        job = DeferredJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status in DONE:
            return Claim(None, done=True)
        if job.status == Status.RUNNING and job.lease_until and job.lease_until > now:
            return Claim(None, wait=(job.lease_until - now).total_seconds())
        if job.expires_at <= now and job.result is None:
            _close(job, Status.EXPIRED, error="The job did not run before it expired.")
            return Claim(None, done=True)
        job.status, job.lease_until = Status.RUNNING, now + timedelta(seconds=lease_seconds)
        job.attempts += 1
        job.started_at = job.started_at or now
        job.save(update_fields=["status", "lease_until", "attempts", "started_at"])
    return Claim(job)


def finish_job(job: DeferredJob, result: dict[str, Any], model: str, usage: Any) -> None:
    """Save the answer (before the user is charged: see the module docstring)."""
    DeferredJob.objects.filter(pk=job.pk).update(
        result=result,
        model=model[:200],
        usage=usage,
        status=Status.SUCCEEDED,
        finished_at=timezone.now(),
        lease_until=None,
        error="",
    )


def fail_job(job: DeferredJob, error: str) -> None:
    """The provider refused the request for good (a 4xx, retries spent): the job failed."""
    _close(job, Status.FAILED, error=error[:2000])


def requeue_job(job: DeferredJob, retry_after: float) -> None:
    """Not now (budget or provider): queue the job again in ``retry_after`` seconds."""
    run_after = timezone.now() + timedelta(seconds=retry_after)
    updated = DeferredJob.objects.filter(pk=job.pk, status=Status.RUNNING).update(
        status=Status.QUEUED, lease_until=None, run_after=run_after
    )
    if updated:
        transaction.on_commit(lambda: _queue(str(job.pk), retry_after))


def requeue_later(job_id: str, seconds: float) -> None:
    """Look at a job again in ``seconds`` (another worker's lease on it runs out then)."""
    _queue(job_id, seconds)


def job_for_owner(user: User, job_id: Any) -> DeferredJob | None:
    """The job with this id if ``user`` owns it, else ``None`` (whoever asks: no one learns
    whether another user's job exists)."""
    if user is None or not user.is_authenticated:
        return None
    return DeferredJob.objects.filter(Q(pk=job_id) & Q(user_id=user.pk)).first()


def _close(job: DeferredJob, status: Any, *, error: str) -> None:
    DeferredJob.objects.filter(pk=job.pk).exclude(status__in=DONE).update(
        status=status, error=error, finished_at=timezone.now(), lease_until=None
    )


def _queue(job_id: str, countdown: float) -> None:
    try:
        dispatch.send(dispatch.RUN_JOB, job_id, countdown=max(countdown, 0.0))
    except Exception:  # the broker is down: the job stays queued, the sweep sends it again
        logger.exception("quotas: could not queue deferred job %s", job_id)


def sweep_jobs(stale_seconds: float = 60.0) -> int:
    """Queue again the jobs whose message was lost (queued past their time by
    ``stale_seconds``, or running with a lease that ran out) and expire the ones past their
    time; returns how many were queued. For a periodic task (``quotas.tasks.sweep_jobs``)."""
    now = timezone.now()
    DeferredJob.objects.filter(status=Status.QUEUED, expires_at__lte=now).update(
        status=Status.EXPIRED, error="The job did not run before it expired.", finished_at=now
    )
    stale = DeferredJob.objects.filter(
        Q(status=Status.QUEUED, run_after__lte=now - timedelta(seconds=stale_seconds))
        | Q(status=Status.QUEUED, run_after__isnull=True)
        | Q(status=Status.RUNNING, lease_until__lte=now)
    ).values_list("pk", flat=True)[:1000]
    ids = [str(pk) for pk in stale]
    for job_id in ids:
        _queue(job_id, 0.0)
    return len(ids)
