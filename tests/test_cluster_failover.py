"""A Redis Cluster master killed under HTTP load (Django's test client through the throttle):
the failure policy applies to the users whose slots it served, and to them only; nothing
escapes as a 5xx; once it is back (empty, as a restart without persistence leaves it) their
windows are rebuilt from the ledger."""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

import pytest
from django.db.models import Sum
from rest_framework.test import APIClient

from quotas import services
from quotas.backends.cluster import hash_slot
from quotas.exceptions import StoreUnavailable
from quotas.http import DEGRADED_HEADER
from quotas.models import UsageRecord

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.enforced_urls"),
]

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 92}
USED_PER_REQUEST = 40  # the view's usage block


def post(user: Any) -> tuple[int, bool, str | None, float]:
    client = APIClient()
    client.force_authenticate(user)
    started = time.monotonic()
    response = client.post("/completion/", BODY, format="json")
    return (
        response.status_code,
        response.has_header(DEGRADED_HEADER),
        response.headers.get("X-RateLimit-Remaining"),
        time.monotonic() - started,
    )


def busiest_master(users: list[Any]) -> tuple[int, list[Any], list[Any]]:
    """The port of the master that serves most of ``users``' slots, the users it serves
    and the others (each side at least one)."""
    nodes = services.get_store().client.nodes_manager
    port_of = {u.pk: nodes.get_node_from_slot(hash_slot(str(u.pk))).port for u in users}
    victim = Tally(port_of.values()).most_common(1)[0][0]
    hit = [u for u in users if port_of[u.pk] == victim]
    spared = [u for u in users if port_of[u.pk] != victim]
    assert hit and spared
    return victim, hit, spared


def ledger_total(user: Any) -> int:
    return UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"] or 0


def test_a_master_killed_under_load_degrades_only_the_users_on_its_slots(
    on_cluster, quota_config, make_plan, make_user
):
    cluster = on_cluster
    url = cluster.url + "?socket_timeout=0.25&socket_connect_timeout=0.25"
    quota_config(REDIS_CLUSTER_URL=url, BREAKER_RESET_SECONDS=1)
    plan = make_plan(tokens_per_hour=100_000)
    users = [make_user(plan=plan) for _ in range(12)]
    for user in users:
        assert post(user)[:2] == (200, False)
    victim, hit, spared = busiest_master(users)

    cluster.stop(victim)
    try:
        results = {u.pk: [post(u) for _ in range(3)] for u in users}
        time.sleep(2.5)  # the other masters mark it failed (node timeout 2 s): still serving
        for u in users:
            results[u.pk] += [post(u) for _ in range(3)]
    finally:
        cluster.start(victim)
        cluster.wait_ok()
    statuses = [r[0] for rows in results.values() for r in rows]
    assert set(statuses) == {200}  # no 5xx, no 429: fail-open, and budgets far away
    for user in spared:  # enforced as ever: never degraded, remaining counts down exactly
        rows = results[user.pk]
        assert not any(r[1] for r in rows)
        remaining = [int(r[2]) for r in rows]
        assert remaining == sorted(remaining, reverse=True)
    for user in hit:  # the failure policy (fail-open) applies, and says so
        assert all(r[1] for r in results[user.pk])
    slowest = max(r[3] for rows in results.values() for r in rows)

    # Back (empty): once the breaker lets a call through, windows come from the ledger.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(post(u)[1] for u in hit):
        time.sleep(0.3)
    for user in users:
        budget = services.budget_for(user)
        assert budget["used"] == ledger_total(user), user.pk
        assert budget["reserved"] == 0
    degraded_rows = UsageRecord.objects.filter(status="degraded")
    assert set(degraded_rows.values_list("user", flat=True)) == {u.pk for u in hit}
    assert slowest < 1.0, slowest  # no request waits on the dead node


@pytest.mark.parametrize("value", ["10.0.0.1:7000", 7000, "http://10.0.0.1:7000"])
def test_a_cluster_url_that_is_not_one_is_refused_by_a_system_check(quota_config, value):
    from django.core.checks import Error, run_checks

    from quotas import checks

    quota_config(REDIS_CLUSTER_URL=value)
    errors = [m for m in run_checks() if m.id and m.id.startswith("quotas.")]
    message = checks.E010_MSG.format(value=value)
    assert errors == [Error(message, hint=checks.E010_HINT, id="quotas.E010")]


def test_a_cluster_no_node_of_which_answers_serves_under_the_failure_policy(
    quota_config, dead_redis_url, make_plan, make_user
):
    quota_config(REDIS_CLUSTER_URL=dead_redis_url, BREAKER_FAILURES=2)
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    started = time.monotonic()
    served = [services.reserve(user, 100) for _ in range(5)]
    assert all(r.degraded for r in served)
    assert time.monotonic() - started < 1.0
    assert services.get_breaker().state.value == "open"  # then no connection is tried
    quota_config(REDIS_CLUSTER_URL=dead_redis_url, FAILURE_POLICY="closed")
    with pytest.raises(StoreUnavailable):
        services.reserve(user, 100)
