"""The ledger sweep finds its work through the registries the scripts keep, never by
``SCAN``: its cost follows the users with records waiting, not the size of the keyspace.
Checked with 100,000 unrelated keys beside the quota keys, on one Redis and on a cluster,
by counting the commands Redis ran (``INFO commandstats``, on servers only this test uses).
Also: a limits change made while Redis cannot take it applies once Redis is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from project.devtools.redis_server import RedisServer, start_private_redis
from quotas import ledger, services
from quotas.exceptions import QuotaExceeded
from quotas.models import ConfigRevision, UsageRecord
from tests.conftest import quotas_settings
from tests.support import refusing_port, sleep_until_redis_ms, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

UNRELATED = 100_000
USERS = 5


@pytest.fixture
def private_redis(tmp_path: Any, isolated_quotas: str) -> Iterator[RedisServer]:
    """The quota store on a Redis only this test uses (so its command counts are its own)."""
    server = start_private_redis(data_dir=tmp_path)
    caches = {
        **settings.CACHES,
        "private": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": server.url,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
        },
    }
    config = quotas_settings(
        KEY_PREFIX=isolated_quotas, CACHE_ALIAS="private", RESERVATION_TTL_SECONDS=1
    )
    with override_settings(CACHES=caches, QUOTAS=config):
        services.reset_runtime()
        yield server
    services.reset_runtime()
    server.stop()


def fill_unrelated(client: Any, prefix: str, *, tagged: bool) -> list[str]:
    """100,000 keys under this test's prefix that are none of the quotas' business."""
    keys = [f"{prefix}:{{junk{i}}}:x" if tagged else f"{prefix}:junk:{i}" for i in range(UNRELATED)]
    for start in range(0, UNRELATED, 5000):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 5000]:
            pipe.set(key, 1)
        pipe.execute()
    return keys


def overdue_reservations(make_plan: Any, make_user: Any) -> None:
    """``USERS`` users with a reservation past its deadline each: the sweep's work."""
    plan = make_plan(tokens_per_hour=1000)
    held = [services.reserve(make_user(plan=plan), 100) for _ in range(USERS)]
    client = services.get_store().client
    node = client.get_random_node().redis_connection if hasattr(client, "nodes_manager") else client
    sleep_until_redis_ms(node, max(r.reserved_at_ms for r in held) + 1001 + 50)


def command_counts(nodes: list[Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for node in nodes:
        for name, stats in node.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            totals[command] = totals.get(command, 0) + int(stats["calls"])
    return totals


def test_the_sweep_never_scans_one_redis(private_redis, isolated_quotas, make_plan, make_user):
    client = redis.Redis.from_url(private_redis.url)
    assert ledger.flush_ledger() == 0  # the once-a-day SCAN for keys older than the registries
    fill_unrelated(client, isolated_quotas, tagged=False)
    overdue_reservations(make_plan, make_user)
    client.config_resetstat()

    assert ledger.flush_ledger() == USERS
    counts = command_counts([client])
    assert UsageRecord.objects.filter(status="expired").count() == USERS
    assert "scan" not in counts and "keys" not in counts
    # Commands (those scripts run included) per user with work, whatever the keyspace: a
    # SCAN of it alone would be 100 calls of 1,000 keys.
    assert sum(counts.values()) <= 25 * USERS, counts


def test_the_sweep_never_scans_a_cluster(
    on_cluster, quota_config, isolated_quotas, make_plan, make_user
):
    quota_config(REDIS_CLUSTER_URL=on_cluster.url, RESERVATION_TTL_SECONDS=1)
    store = services.get_store()
    assert ledger.flush_ledger() == 0
    fill_unrelated(store.client, isolated_quotas, tagged=True)
    overdue_reservations(make_plan, make_user)
    nodes = [redis.Redis(port=port) for port in on_cluster.ports]
    for node in nodes:
        node.config_resetstat()

    assert ledger.flush_ledger() == USERS
    counts = command_counts(nodes)
    assert UsageRecord.objects.filter(status="expired").count() == USERS
    assert "scan" not in counts and "keys" not in counts
    # Per slot in use a registry look, per user with work a few calls: not the keyspace.
    assert sum(counts.values()) <= 25 * USERS + 20, counts
    pipe = store.client.pipeline(transaction=False)  # leave the session's cluster as it was
    for key in store.client.scan_iter(match=f"*{isolated_quotas}:{{junk*", count=5000):
        pipe.delete(key)
    pipe.execute()


def test_a_limits_change_made_while_redis_is_unreachable_applies_once_it_is_back(
    private_redis, isolated_quotas, make_plan, make_user
):
    plan = make_plan(tokens_per_hour=1000)
    user = make_user(plan=plan)
    services.reserve(user, 100)
    store = services.get_store()
    before = store.current_version()  # what every other process's limits are tagged with
    with refusing_port() as port:  # this process cannot reach Redis while the edit is saved
        dead = {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
        }
        unreachable = quotas_settings(KEY_PREFIX=isolated_quotas, CACHE_ALIAS="dead")
        with override_settings(CACHES={**settings.CACHES, "dead": dead}, QUOTAS=unreachable):
            services.reset_runtime()
            plan.tokens_per_hour = 150
            plan.save()  # the version cannot be bumped now: it is retried in the background
    services.reset_runtime()
    assert store.current_version() == before
    # Redis is reachable again: the bump lands, so every process reloads its limits.
    assert wait_until(lambda: store.current_version() != before, timeout=10)
    services.reserve(user, 40)
    with pytest.raises(QuotaExceeded):
        services.reserve(user, 20)


def test_a_limits_change_whose_process_is_gone_before_redis_is_back_applies_at_the_sweep(
    private_redis, isolated_quotas, make_plan, make_user
):
    from quotas.engine import config, runtime
    from quotas.tasks import flush_ledger_task

    plan = make_plan(tokens_per_hour=1000)
    user = make_user(plan=plan)
    services.reserve(user, 100)
    store = services.get_store()
    before = store.current_version()
    elsewhere = config.configs()  # limits another process read before the edit
    with refusing_port() as port:
        dead = {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
        }
        unreachable = quotas_settings(KEY_PREFIX=isolated_quotas, CACHE_ALIAS="dead")
        with override_settings(CACHES={**settings.CACHES, "dead": dead}, QUOTAS=unreachable):
            services.reset_runtime()
            plan.tokens_per_hour = 150
            plan.save()
            # The saving process dies: its retry thread stops at its next wake-up (2 s).
            config._pending_bump.clear()
    services.reset_runtime()
    runtime._runtime["configs"] = elsewhere  # this process now plays the other one
    time.sleep(2.5)  # past the retry thread's wake-up: it must have stopped, not bumped
    assert store.current_version() == before
    services.reserve(user, 100)  # the other process still decides on 1,000: 200 taken

    # The beat's next sweep, in any worker, finds the database ahead of Redis and publishes.
    flush_ledger_task.apply()
    assert store.current_version() != before
    assert store.published_revision() == ConfigRevision.objects.get(pk=1).revision
    with pytest.raises(QuotaExceeded):
        services.reserve(user, 1)  # 200 taken of the new 150
    # Published once: the next sweep leaves the version alone.
    after = store.current_version()
    flush_ledger_task.apply()
    assert store.current_version() == after


def test_a_redis_restarted_empty_gets_a_version_no_process_can_hold(
    private_redis, isolated_quotas, make_plan
):
    """A bump on a Redis that lost the version starts from the clock, not from 1 (a version
    processes could hold limits tagged with from an earlier loss)."""
    store = services.get_store()
    make_plan(tokens_per_hour=1000)  # a change: the database's revision is ahead of none
    store.client.delete(store.version_key, store.revision_key)
    assert services.publish_config_changes()
    assert int(store.current_version()) > 1_000_000_000_000
    assert not services.publish_config_changes()
