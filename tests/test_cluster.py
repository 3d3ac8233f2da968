"""The engine on a real Redis Cluster (three masters on loopback ports, see
``tests/cluster_support.py``): every layer of a decision exact under concurrency, settle,
expiry, the rebuild from the ledger, and the ledger sweep without ``SCAN``."""

from __future__ import annotations

import multiprocessing
from collections import Counter as Tally
from typing import Any

import pytest
from django.db import connections
from django.db.models import Sum

from quotas import ledger, services
from quotas.backends.cluster import ClusterWindowStore, hash_slot
from quotas.exceptions import QuotaExceeded
from quotas.models import GlobalLimit, Plan, Team, UsageRecord, UserQuota
from tests.support import sleep_until_redis_ms
from tests.test_layered_concurrency import (
    ATTEMPTS,
    GLOBAL_BUDGET,
    PROCESSES,
    TEAM_BUDGET,
    THREADS,
    TOKENS,
    _hammer,
    _members,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def cluster_keys(prefix: str) -> list[Any]:
    """Every key of this test's prefix on the cluster (every master)."""
    return list(services.get_store().client.scan_iter(match=f"*{prefix}:*", count=1000))


def lose_windows(prefix: str) -> None:
    """What masters restarted without persistence do to this test's keys."""
    client = services.get_store().client
    keys = cluster_keys(prefix)
    assert keys, "the test should have windows to lose"
    for key in keys:
        client.delete(key)


def ledger_total(user: Any) -> int:
    return UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"] or 0


def hammer(users: list[Any], quota_config: Any, url: str) -> Tally[int]:
    """``PROCESSES`` processes of ``THREADS`` threads reserve for ``users`` at once, on the
    cluster (patient sockets, fail-closed: this measures atomicity, not the failure policy)."""
    patient = url + "?socket_timeout=10&socket_connect_timeout=10"
    quota_config(FAILURE_POLICY="closed", REDIS_CLUSTER_URL=patient)
    services.config_changed()
    for user in users:
        services.reserve(user, 0)  # limits cached, counters built: children need no DB
    connections.close_all()
    with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
        results = pool.map(_hammer, [(users, seed) for seed in range(PROCESSES)])
    assert sum(failures for _, failures in results) == 0
    admitted: Tally[int] = Tally()
    for per_user, _ in results:
        admitted.update(per_user)
    return admitted


def test_the_store_is_the_cluster_store(on_cluster, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    reservation = services.reserve(user, 400)
    assert isinstance(services.get_store(), ClusterWindowStore)
    services.settle(reservation, total_tokens=100)
    assert services.budget_for(user)["used"] == 100
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 901)
    assert refused.value.retry_after > 0


def test_layers_in_three_slots_decide_all_or_nothing(on_cluster, make_plan, make_user):
    team = Team.objects.create(slug="t", name="T", plan=make_plan(tokens_per_hour=500))
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=3600, budget=800)
    user = make_user(plan=make_plan(tokens_per_hour=10_000))
    UserQuota.objects.filter(user=user).update(team=team)
    services.config_changed()
    store = services.get_store()
    slots = {hash_slot(services.reserve(user, 0).scope), hash_slot(f"t:{team.pk}"), hash_slot("g")}
    assert len(slots) == 3  # the layers really live in three slots
    first = services.reserve(user, 300)
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 300)  # the team refuses: the global layer keeps nothing
    assert refused.value.limit_scope == "team"
    limits = {e["name"]: e["used"] for e in services.budget_for(user)["limits"]}
    assert limits["team-tokens-hour"] == 300
    assert limits["global-tokens-hour"] == 300
    services.settle(first, total_tokens=100)  # corrected in every slot
    limits = {e["name"]: e["used"] for e in services.budget_for(user)["limits"]}
    assert limits["team-tokens-hour"] == 100
    assert limits["global-tokens-hour"] == 100
    assert services.budget_for(user)["used"] == 100
    assert isinstance(store, ClusterWindowStore)


def test_one_user_under_eight_processes_is_admitted_exactly_its_budget(
    on_cluster, make_plan, make_user, quota_config
):
    user = make_user(plan=make_plan(tokens_per_hour=2_000))
    admitted = hammer([user], quota_config, on_cluster.url)
    assert admitted[user.pk] == 2_000
    assert services.budget_for(user)["used"] == 2_000


def test_a_team_budget_on_its_own_slot_is_used_exactly(
    on_cluster, make_plan, make_user, quota_config
):
    members = _members(make_plan, make_user, 8)
    admitted = hammer(members, quota_config, on_cluster.url)
    assert sum(admitted.values()) == TEAM_BUDGET
    team = {e["name"]: e["used"] for e in services.budget_for(members[0])["limits"]}
    assert team["team-tokens-hour"] == TEAM_BUDGET


def test_no_layer_in_any_slot_ever_admits_beyond_its_budget(
    on_cluster, make_plan, make_user, quota_config
):
    members = _members(make_plan, make_user, 4)
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=3600, budget=GLOBAL_BUDGET)
    outsiders = [make_user(plan=make_plan(tokens_per_hour=1_000_000)) for _ in range(4)]
    users = members + outsiders
    admitted = hammer(users, quota_config, on_cluster.url)
    by_team, everyone = sum(admitted[u.pk] for u in members), sum(admitted.values())
    assert PROCESSES * THREADS * ATTEMPTS * TOKENS > 2 * GLOBAL_BUDGET
    assert by_team <= TEAM_BUDGET
    # Never beyond; short of it only by what a refusal elsewhere held for a moment.
    assert GLOBAL_BUDGET - 10 * TOKENS <= everyone <= GLOBAL_BUDGET
    limits = {e["name"]: e["used"] for e in services.budget_for(members[0])["limits"]}
    assert limits["team-tokens-hour"] == by_team  # what was given back left no trace
    assert limits["global-tokens-hour"] == everyone
    for user in users:
        assert services.budget_for(user)["used"] == admitted[user.pk]


def test_an_unsettled_reservation_expires_into_the_ledger(
    on_cluster, make_plan, make_user, quota_config
):
    quota_config(RESERVATION_TTL_SECONDS=1, REDIS_CLUSTER_URL=on_cluster.url)
    users = [make_user(plan=make_plan(tokens_per_hour=1000)) for _ in range(6)]
    held = [services.reserve(user, 300) for user in users]
    client = services.get_store().client
    deadline = max(r.reserved_at_ms for r in held) + 1001
    sleep_until_redis_ms(client.get_random_node().redis_connection, deadline + 50)
    assert ledger.flush_ledger(scan=False) == 6
    assert ledger.flush_ledger(scan=False) == 0
    assert set(UsageRecord.objects.values_list("status", flat=True)) == {"expired"}
    for user in users:
        budget = services.budget_for(user)
        assert (budget["used"], budget["reserved"]) == (300, 0)
    assert services.get_store().backlog() == (0, None)


def test_settled_usage_reaches_the_ledger_once_from_every_slot(on_cluster, make_plan, make_user):
    users = [make_user(plan=make_plan(tokens_per_hour=1000)) for _ in range(8)]
    assert len({hash_slot(str(u.pk)) for u in users}) == 8
    for user in users:
        services.settle(services.reserve(user, 200), total_tokens=150)
    assert ledger.flush_ledger(scan=False) == 0  # the rows were written at the settle
    assert services.get_store().backlog() == (0, None)
    assert UsageRecord.objects.count() == 8
    assert {ledger_total(u) for u in users} == {150}


def test_lost_windows_are_rebuilt_from_the_ledger_at_every_layer(
    on_cluster, isolated_quotas, make_plan, make_user
):
    team = Team.objects.create(slug="t", name="T", plan=make_plan(tokens_per_hour=5000))
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=3600, budget=9000)
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    UserQuota.objects.filter(user=user).update(team=team)
    services.config_changed()
    services.settle(services.reserve(user, 600), total_tokens=550)
    services.settle(services.reserve(user, 300), total_tokens=250)
    lose_windows(isolated_quotas)
    services.reset_runtime()  # a process that knew nothing of it

    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 201)  # 800 of 1000 in the ledger
    assert refused.value.remaining == 200
    limits = {e["name"]: e["used"] for e in services.budget_for(user)["limits"]}
    assert limits["team-tokens-hour"] == limits["global-tokens-hour"] == 800
    assert services.reserve(user, 200).remaining == 0


def test_a_limits_change_reaches_every_slot_of_every_process(on_cluster, make_plan, make_user):
    plan = make_plan(tokens_per_hour=1000)
    users = [make_user(plan=plan) for _ in range(6)]
    assert len({hash_slot(str(u.pk)) for u in users}) == 6
    for user in users:
        services.reserve(user, 0)  # this process holds the limits, read at this version
    # Another process's edit: this one drops nothing itself, the version copies tell it.
    Plan.objects.filter(pk=plan.pk).update(tokens_per_hour=50)
    services.get_store().bump_version()
    for user in users:
        services.reserve(user, 40)
        with pytest.raises(QuotaExceeded):
            services.reserve(user, 20)


def test_a_refusal_waits_for_the_slowest_layer_in_any_slot(on_cluster, make_plan, make_user):
    # The global layer (its own slot, asked first) would fit again in two minutes, the
    # user's hour only when its usage leaves: the Retry-After is the user's, never early.
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=120, budget=1000)
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    services.config_changed()
    services.reserve(user, 900)
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 200)
    assert refused.value.limit_scope == "user"
    assert refused.value.retry_after > 3000
    limits = {e["name"]: e["used"] for e in services.budget_for(user)["limits"]}
    assert limits["global-tokens-2m"] == 900  # the refusal kept nothing anywhere
    assert services.budget_for(user)["used"] == 900


def test_the_background_jobs_run_on_a_cluster(on_cluster, isolated_quotas, make_plan, make_user):
    plan = make_plan(tokens_per_hour=1000)
    users = [make_user(plan=plan) for _ in range(4)]
    for user in users:
        services.settle(services.reserve(user, 300), total_tokens=120)
    assert ledger.flush_ledger(scan=True) == 0  # SCAN of every master: nothing left over
    assert ledger.audit_windows() == []  # the windows agree with the ledger
    lose_windows(isolated_quotas)
    assert sorted(ledger.rebuild_windows()) == sorted(str(u.pk) for u in users)
    assert [services.budget_for(u)["used"] for u in users] == [120] * 4
    assert services.get_store().backlog() == (0, None)


def test_every_slot_has_a_hash_tag_that_lands_in_it():
    from redis.crc import key_slot

    from quotas.backends.cluster import slot_tag

    for slot in range(0, 16384, 7):
        assert key_slot(f"quotas:{{{slot_tag(slot)}}}:ledger:due".encode()) == slot
    for tag in ("1", "a:127.0.0.1", "t:7", "g"):
        assert hash_slot(tag) == key_slot(f"prefix:{{{tag}}}:w".encode())
