"""The engine on a real Redis Cluster (three masters on loopback ports, see
``tests/cluster_support.py``): every layer of a decision exact under concurrency, settle,
expiry, the rebuild from the ledger, and the ledger sweep without ``SCAN``."""

from __future__ import annotations

import pytest

from quotas import services
from quotas.backends.cluster import ClusterWindowStore, hash_slot
from quotas.exceptions import QuotaExceeded
from quotas.models import GlobalLimit, Team, UserQuota

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


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
