"""Sentinel failover under HTTP load: the store on django-redis's ``SentinelClient``, the
primary killed while requests keep coming (Django's test client through the throttle). The
replica is promoted; no request is a 5xx or takes 1.5 s; every served request is in the
ledger, and after the audit the windows on the new primary agree with it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Sum
from django.test import override_settings
from rest_framework.test import APIClient

from quotas import ledger, services
from quotas.http import DEGRADED_HEADER
from quotas.models import UsageRecord
from tests.cluster_support import ClusterUnavailable
from tests.conftest import quotas_settings
from tests.sentinel_support import SERVICE, LocalSentinels
from tests.support import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.enforced_urls"),
]

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 92}


@pytest.fixture
def sentinels() -> Any:
    try:
        setup = LocalSentinels().begin()
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start Redis Sentinel here: {exc}")
    yield setup
    setup.end()


@pytest.fixture
def on_sentinel(sentinels: LocalSentinels, isolated_quotas: str) -> Any:
    alias = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{SERVICE}/0",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
            "SENTINELS": [("127.0.0.1", port) for port in sentinels.sentinels],
            "SOCKET_CONNECT_TIMEOUT": 0.25,
            "SOCKET_TIMEOUT": 0.25,
        },
    }
    # Ledger records go in batches from a background thread, as in production (the test
    # default writes each row inside the request, which times the database, not Redis).
    config = quotas_settings(
        KEY_PREFIX=isolated_quotas,
        CACHE_ALIAS="sentinel",
        BREAKER_RESET_SECONDS=0.5,
        LEDGER_BATCH_SECONDS=0.05,
    )
    with override_settings(CACHES={**settings.CACHES, "sentinel": alias}, QUOTAS=config):
        services.reset_runtime()
        yield sentinels
    services.reset_runtime()


def post(user: Any) -> dict[str, Any]:
    client = APIClient()
    client.force_authenticate(user)
    started = time.monotonic()
    response = client.post("/completion/", BODY, format="json")
    return {
        "status": response.status_code,
        "degraded": response.has_header(DEGRADED_HEADER),
        "seconds": time.monotonic() - started,
    }


def test_the_primary_killed_under_load_fails_over_with_nothing_lost(
    on_sentinel, make_plan, make_user
):
    sentinels = on_sentinel
    plan = make_plan(tokens_per_hour=1_000_000)
    users = [make_user(plan=plan) for _ in range(4)]
    results: list[dict[str, Any]] = []

    def load(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            results.extend(post(user) for user in users)

    load(1.0)
    assert services.get_store().client.connection_pool.service_name == SERVICE
    sentinels.kill_primary()
    deadline = time.monotonic() + 30
    while sentinels.current_primary() != sentinels.replica and time.monotonic() < deadline:
        load(0.2)
    assert sentinels.current_primary() == sentinels.replica, "no failover within 30 s"
    promoted_at = len(results)
    load(3.0)  # the breaker probes again after 0.5 s, then the new primary serves

    assert {r["status"] for r in results} == {200}
    assert max(r["seconds"] for r in results) < 1.5
    assert any(r["degraded"] for r in results[:promoted_at])  # the outage was real
    assert not any(r["degraded"] for r in results[-len(users) * 3 :])  # and it is over
    # Every served request in the ledger, once (what this process's batch still holds is
    # sent now, as it would be within LEDGER_BATCH_SECONDS).
    services.flush_ledger_batch()
    written = lambda: UsageRecord.objects.count()  # noqa: E731
    assert wait_until(lambda: written() == len(results), timeout=30), (written(), len(results))
    ledger.flush_ledger()
    ledger.audit_windows()
    for user in users:
        used = UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"]
        assert services.budget_for(user)["used"] == used
