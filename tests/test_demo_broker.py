"""Demo instances on one Redis have brokers of their own: a message one instance's Celery
publishes is never seen by another's (whatever database REDIS_URL names, or QUOTAS_KEY_PREFIX)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings

pytestmark = pytest.mark.integration

QUEUE_SCRIPT = textwrap.dedent(
    """
    import queue, sys
    from project.celery import app

    action, name = sys.argv[1], sys.argv[2]
    with app.connection_for_write() as conn:
        box = conn.SimpleQueue(name)
        if action == "put":
            box.put({"hello": "from " + name})
            print("put")
        else:
            try:
                message = box.get(timeout=1)
            except queue.Empty:
                print("empty")
            else:
                message.ack()
                print("got")
        box.close()
    """
)


def run_instance(action: str, queue_name: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", QUEUE_SCRIPT, action, queue_name],
        cwd=Path(settings.BASE_DIR),
        env={**base_env(), "DJANGO_SETTINGS_MODULE": "project.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def base_env() -> dict[str, str]:
    """This environment without a CELERY_BROKER_URL: each instance derives its own."""
    return {key: value for key, value in os.environ.items() if key != "CELERY_BROKER_URL"}


def redis_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.mark.parametrize("second", ["other database", "other key prefix"])
def test_a_second_instance_never_sees_the_first_ones_messages(second):
    run = uuid.uuid4().hex[:8]
    queue_name = f"broker-test-{run}"  # no real worker consumes it
    first = {"REDIS_URL": redis_db(settings.REDIS_URL, 0), "QUOTAS_KEY_PREFIX": f"a-{run}"}
    other = (
        {**first, "REDIS_URL": redis_db(settings.REDIS_URL, 2)}
        if second == "other database"
        else {**first, "QUOTAS_KEY_PREFIX": f"b-{run}"}
    )
    assert run_instance("put", queue_name, **first) == "put"
    try:
        assert run_instance("get", queue_name, **other) == "empty"
    finally:
        assert run_instance("get", queue_name, **first) == "got"  # and that takes it away
        for db in (0, 1, 2):  # kombu's bindings of this test's queue, wherever they went
            client = redis.Redis.from_url(redis_db(settings.REDIS_URL, db))
            keys = list(client.scan_iter(match=f"*{run}*", count=1000))
            if keys:
                client.delete(*keys)
