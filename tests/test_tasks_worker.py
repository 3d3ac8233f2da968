"""The ledger tasks in a real Celery worker process, killed mid-batch and restarted.

The worker consumes a queue of its own under a broker key prefix of its own, so it never
takes other workers' tasks from the shared broker (nor they its). Its unacknowledged
messages become visible again after 2 s instead of the default hour.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from django.db import connection, transaction
from kombu import Connection

from quotas.models import UsageRecord
from quotas.tasks import record_usage_task
from tests.conftest import celery_conf

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
WORKER = """
import json, os, sys
from project.celery import app
app.conf.imports = [*app.conf.imports, "tests.worker_tasks"]  # a task that settles
app.conf.broker_transport_options = {
    **app.conf.broker_transport_options, **json.loads(os.environ["TEST_BROKER_OPTIONS"])
}
app.worker_main(["worker", *sys.argv[1:]])
"""


def database_url() -> str:
    """The URL of the test database this test process uses (for the worker's settings)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def broker() -> Iterator[dict[str, Any]]:
    """A private corner of the broker: queue name, key prefix, transport options."""
    from project.celery import app

    run = uuid.uuid4().hex[:10]
    options = {
        "global_keyprefix": f"quotas-test-{run}:",
        "visibility_timeout": 2,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    with celery_conf(task_always_eager=False):
        yield {"url": app.conf.broker_url, "queue": f"quotas-test-{run}", "options": options}
    client = redis.Redis.from_url(app.conf.broker_url)
    keys = list(client.scan_iter(match=f"{options['global_keyprefix']}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def start_worker(broker: dict[str, Any]) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    yield from _workers(broker, {})


def _workers(
    broker: dict[str, Any], extra_env: dict[str, str], pool: tuple[str, ...] = ("solo",)
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """``start()`` starts a worker on ``broker``'s queue; all are stopped afterwards."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": broker["url"],
        "TEST_BROKER_OPTIONS": json.dumps(broker["options"]),
        # System checks have their own tests; this worker only needs the models.
        "CELERY_SKIP_CHECKS": "1",
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    workers: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-c", WORKER, "--pool", *pool, "-Q", broker["queue"],
            "-n", f"{broker['queue']}-{len(workers)}@%h", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        workers.append(subprocess.Popen(command, env=env, cwd=ROOT))
        return workers[-1]

    yield start
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(10)


def payloads(n: int) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return [
        {
            "request_id": f"worker-test/{uuid.uuid4().hex}",
            "scope": "worker-test",
            "user_id": None,
            "model": "gpt-4o",
            "estimated_tokens": 100,
            "prompt_tokens": 20,
            "completion_tokens": 50,
            "actual_tokens": 70,
            "status": "settled",
            "reserved_at_ms": now_ms,
            "settled_at_ms": now_ms,
        }
        for _ in range(n)
    ]


def publish(broker: dict[str, Any], batch: list[dict[str, Any]]) -> None:
    with (
        Connection(broker["url"], transport_options=broker["options"]) as conn,
        conn.Producer() as producer,
    ):
        for payload in batch:
            record_usage_task.apply_async(args=[payload], queue=broker["queue"], producer=producer)


@contextmanager
def ledger_locked() -> Iterator[None]:
    """Hold a lock that makes every other insert into the ledger wait."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            if connection.vendor == "sqlite":
                cursor.execute("DELETE FROM quotas_usagerecord WHERE id < 0")  # the write lock
            else:
                cursor.execute("LOCK TABLE quotas_usagerecord IN SHARE ROW EXCLUSIVE MODE")
        yield
        transaction.set_rollback(True)


def wait_for_rows(at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = UsageRecord.objects.count()
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
        count = UsageRecord.objects.count()
    return count


def test_a_killed_worker_loses_no_usage_and_counts_none_twice(broker, start_worker):
    batch = payloads(300)
    # The same payload twice (a producer that retried a publish): still one row.
    publish(broker, [*batch, batch[0]])
    client = redis.Redis.from_url(broker["url"])
    prefix = broker["options"]["global_keyprefix"]
    worker = start_worker()
    wait_for_rows(20, timeout=30)
    with ledger_locked():  # the worker's next insert waits: it dies holding a message
        assert wait_until(lambda: client.hlen(f"{prefix}unacked") >= 1, timeout=10)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    assert 20 <= UsageRecord.objects.count() < len(batch), "the worker died mid-batch"

    start_worker()
    assert wait_for_rows(len(batch), timeout=30) == len(batch)
    ids = list(UsageRecord.objects.values_list("request_id", flat=True))
    assert sorted(ids) == sorted(p["request_id"] for p in batch)
    # The duplicate (published last) and any re-delivery are consumed, and added no row.
    assert wait_until(lambda: client.llen(f"{prefix}{broker['queue']}") == 0, timeout=30)
    assert wait_until(lambda: client.hlen(f"{prefix}unacked") == 0, timeout=30)
    assert UsageRecord.objects.count() == len(batch)


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the audit a rebuild schedules --------------------------------------------------------
@pytest.fixture
def private_broker(private_redis: Any) -> Iterator[dict[str, Any]]:
    """This process publishes its tasks (as the services queue them, on the default queue)
    to a broker of this run's own: a private redis-server."""
    from project.celery import app

    private_redis.start()

    def drop_pools() -> None:
        app._pool = None
        app.amqp._producer_pool = None

    # The worker must read the queue this process writes: the same broker key prefix (the
    # demo derives it from its quota key prefix, which the worker's environment changes).
    prefix = app.conf.broker_transport_options.get("global_keyprefix", "")
    with celery_conf(broker_url=private_redis.url, task_always_eager=False):
        drop_pools()
        yield {"url": private_redis.url, "queue": "celery", "options": {"global_keyprefix": prefix}}
    drop_pools()
    redis.Redis.from_url(private_redis.url).flushdb()  # this run's own server


@pytest.fixture
def start_quota_worker(
    private_broker: dict[str, Any], isolated_quotas: str
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A worker on the private broker that sees this test's quota windows."""
    from django.conf import settings

    env = {"QUOTAS_KEY_PREFIX": isolated_quotas, "REDIS_URL": settings.REDIS_URL}
    yield from _workers(private_broker, env)


@pytest.mark.slow  # the audit is queued with a countdown of at least 5 s
def test_the_audit_a_rebuild_schedules_runs_in_a_worker_and_repairs_the_window(
    start_quota_worker, make_plan, make_user, quota_config, dead_cache, redis_client
):
    from quotas import services

    quota_config(BREAKER_RESET_SECONDS=0.1)  # the audit's countdown: 2 x 0.1 + 5 s
    start_quota_worker()
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    scope = str(user.pk)
    services.settle(services.reserve(user, 100))  # its row is written by the worker
    assert wait_until(lambda: UsageRecord.objects.filter(user=user).count() == 1, timeout=60)

    redis_client.delete(*services.get_store().keys(scope))  # Redis restarts empty
    quota_config(CACHE_ALIAS=dead_cache)
    degraded = services.reserve(user, 300)  # a process whose breaker has not probed yet
    assert degraded.degraded
    quota_config(CACHE_ALIAS="default")
    services.reserve(user, 10)  # rebuilds the window from the ledger: 100, plus these 10
    assert services.budget_for(user)["used"] == 110
    quota_config(CACHE_ALIAS=dead_cache)
    services.settle(degraded, total_tokens=250)  # its row reaches the ledger after the rebuild
    quota_config(CACHE_ALIAS="default")

    # Nothing in this process audits: the worker runs the audit the rebuild queued.
    assert wait_until(lambda: services.budget_for(user)["used"] == 360, timeout=30)
    assert UsageRecord.objects.filter(user=user).count() == 2


@pytest.fixture
def start_prefork_quota_worker(
    private_broker: dict[str, Any], isolated_quotas: str
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A prefork worker (one child) like ``start_quota_worker``'s, whose ledger batch is sent
    only when it must be: at exit."""
    from django.conf import settings

    env = {
        "QUOTAS_KEY_PREFIX": isolated_quotas,
        "REDIS_URL": settings.REDIS_URL,
        "QUOTAS_LEDGER_BATCH_SECONDS": "3600",
    }
    yield from _workers(private_broker, env, pool=("prefork", "--concurrency", "1"))


def test_a_prefork_child_sends_its_ledger_batch_when_the_worker_shuts_down(
    start_prefork_quota_worker, start_quota_worker, make_plan, make_user
):
    """A pool child leaves with ``os._exit``: no ``atexit`` hook runs there, so the record a
    task's settle left in its batch is sent at ``worker_process_shutdown``, and reaches the
    ledger through the next worker (nothing here sweeps the outbox)."""
    from quotas import services
    from tests.worker_tasks import reserve_and_settle

    user = make_user(plan=make_plan(tokens_per_hour=1000))
    worker = start_prefork_quota_worker()
    reserve_and_settle.apply_async(args=[user.pk, 70])
    assert wait_until(lambda: services.budget_for(user)["used"] == 70, timeout=60)
    assert wait_until(lambda: services.budget_for(user)["reserved"] == 0, timeout=10)
    time.sleep(0.5)  # the batch waits for its hour: no row yet
    assert not UsageRecord.objects.filter(user=user).exists()
    worker.send_signal(signal.SIGTERM)  # a warm shutdown: the child is told to leave
    worker.wait(30)
    start_quota_worker()  # writes the row of the batch the child sent at its exit
    assert wait_until(lambda: UsageRecord.objects.filter(user=user).count() == 1, timeout=60)
    assert UsageRecord.objects.get(user=user).actual_tokens == 70
