"""A deferred job in a real Celery worker, killed mid-job: the job still runs exactly once
(one answer saved, one ledger row, the user charged once), and only its owner reads it.

The worker consumes the default queue under a broker key prefix of its own (see
``tests/test_tasks_worker.py``), so the jobs it queues again stay in its corner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from quotas import services
from quotas.engine import dispatch
from quotas.models import DeferredJob, UsageRecord
from quotas.tasks import run_deferred_job_task
from tests.llm.conftest import chat, used
from tests.test_tasks_worker import ROOT, WORKER, broker, database_url, wait_until
from tests.upstream_server import Upstream, running_upstream

__all__ = ["broker"]  # the fixture, used by name

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with running_upstream("--rpm", "1000", "--tpm", "1000000") as server:
        yield server


@pytest.fixture
def start_worker(
    broker: dict[str, Any], upstream: Upstream, isolated_quotas: str
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": broker["url"],
        "TEST_BROKER_OPTIONS": json.dumps(broker["options"]),
        "CELERY_SKIP_CHECKS": "1",
        "PYTHONPATH": str(ROOT),
        "QUOTAS_KEY_PREFIX": isolated_quotas,
        "QUOTAS_LEDGER_BATCH_SECONDS": "0",
        "QUOTAS_LLM_DEADLINE_SECONDS": "4",
        "QUOTAS_LLM_ATTEMPT_TIMEOUT_SECONDS": "3",
        "GATEWAY_UPSTREAM_URL": upstream.url,
    }
    workers: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-c",
            WORKER,
            "--pool",
            "solo",
            "-Q",
            "celery",
            "-n",
            f"{broker['queue']}-{len(workers)}@%h",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        workers.append(subprocess.Popen(command, env=env, cwd=ROOT))
        return workers[-1]

    yield start
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(10)


def test_a_job_whose_worker_is_killed_mid_call_runs_exactly_once(
    broker, start_worker, upstream, make_plan, make_user
):
    user = make_user(plan=make_plan(tokens_per_hour=100_000))
    saved = dispatch._senders[dispatch.RUN_JOB]
    dispatch.register(dispatch.RUN_JOB, lambda *args, **kwargs: None)  # published below
    try:
        job = services.defer_job(user, "upstream", chat(), 0)
    finally:
        dispatch.register(dispatch.RUN_JOB, saved)
    with (
        Connection(broker["url"], transport_options=broker["options"]) as conn,
        conn.Producer() as producer,
    ):
        run_deferred_job_task.apply_async(args=[str(job.pk)], producer=producer)

    upstream.control(mode="hang", fail_count=1, hang_seconds=20)  # the first call hangs
    worker = start_worker()
    assert wait_until(lambda: upstream.stats().get("hung", 0) == 1, timeout=30)
    worker.send_signal(signal.SIGKILL)  # mid-call: reserved, sent, never answered
    worker.wait(10)
    assert DeferredJob.objects.get(pk=job.pk).status == "running"

    start_worker()  # the message comes back; the job's lease runs out (deadline + 5 s)
    assert wait_until(lambda: _status(job) == "succeeded", timeout=45)
    done = DeferredJob.objects.get(pk=job.pk)
    total = done.usage["prompt_tokens"] + done.usage["completion_tokens"]
    assert done.attempts == 2 and done.result["choices"][0]["message"]["content"]
    assert wait_until(lambda: UsageRecord.objects.count() == 1, timeout=20)
    time.sleep(1)  # any second run or row would show up now
    row = UsageRecord.objects.get()
    assert row.request_id == f"{user.pk}/job-{job.pk}" and row.actual_tokens == total
    assert used(user) == total  # charged once
    assert upstream.stats()["served"] == 1

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    answer = api.get(f"/quotas/jobs/{job.pk}/").json()
    assert answer["status"] == "succeeded" and answer["result"] == done.result


def _status(job: DeferredJob) -> str:
    return DeferredJob.objects.get(pk=job.pk).status
