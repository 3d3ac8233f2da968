"""A Redis Cluster master that has a replica, killed under HTTP load (Django's test client
through the throttle): the failure policy applies to the users whose slots it served while
the cluster promotes the replica, and to them only; then they are enforced again on the
promoted replica, without the dead node ever coming back. Nothing escapes as a 5xx, no
request waits on the dead node, and the ledger and the windows agree afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from quotas import ledger, services
from quotas.backends.cluster import hash_slot
from quotas.models import UsageRecord
from tests.cluster_support import ClusterUnavailable, LocalCluster
from tests.test_cluster_failover import busiest_master, ledger_total, post

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.enforced_urls"),
]

SLOWEST = 1.5  # seconds: 0.25 s socket timeouts, so no request should come near this
BREAKER_RESET = 1  # seconds: how often an open breaker lets one call through
RECOVERY = 15.0  # seconds after the promotion within which every user is enforced again


@pytest.fixture(scope="module")
def replica_cluster() -> Iterator[LocalCluster]:
    """Three masters with one replica each, for this module (node timeout 1 s: a dead
    master is noticed, and its replica promoted, in a few seconds)."""
    try:
        cluster = LocalCluster(replicas=1, node_timeout_ms=1000).begin()
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start a Redis Cluster with replicas here: {exc}")
    yield cluster
    cluster.end()


class Load:
    """Every user's requests, in rounds, each with when it started."""

    def __init__(self, users: list[Any]) -> None:
        self.users = users
        self.results: dict[int, list[tuple[float, int, bool, str | None, float]]] = {
            u.pk: [] for u in users
        }

    def round(self) -> None:
        for user in self.users:
            self.results[user.pk].append((time.monotonic(), *post(user)))

    def of(self, users: list[Any]) -> list[tuple[float, int, bool, str | None, float]]:
        return [r for u in users for r in self.results[u.pk]]


def test_a_master_killed_with_a_replica_fails_over_and_enforcement_follows_the_replica(
    replica_cluster, quota_config, make_plan, make_user
):
    cluster = replica_cluster
    url = cluster.url + "?socket_timeout=0.25&socket_connect_timeout=0.25"
    quota_config(REDIS_CLUSTER_URL=url, BREAKER_RESET_SECONDS=BREAKER_RESET)
    plan = make_plan(tokens_per_hour=100_000)
    users = [make_user(plan=plan) for _ in range(12)]
    load = Load(users)
    load.round()  # the first requests (connections, scripts, caches) are not timed
    load.round()
    assert {r[1:3] for r in load.of(users)} == {(200, False)}
    victim, hit, spared = busiest_master(users)

    promoted: dict[str, Any] = {}

    def watch() -> None:  # when the cluster has promoted the replica, every node agreeing
        try:
            promoted["port"] = cluster.wait_promoted(victim, timeout=30)
        finally:
            promoted["at"] = time.monotonic()

    watcher = threading.Thread(target=watch)
    watcher.start()
    cluster.stop(victim)  # SIGKILL; never started again in this test
    killed = time.monotonic()
    while watcher.is_alive():
        load.round()
    watcher.join()
    assert "port" in promoted, "the cluster did not promote the replica"
    deadline = promoted["at"] + RECOVERY
    while time.monotonic() < deadline and any(load.results[u.pk][-1][2] for u in hit):
        load.round()
    recovered = time.monotonic()
    for _ in range(3):
        load.round()

    rows = load.of(users)
    failover = promoted["at"] - killed
    degraded = [r for r in load.of(hit) if r[2]]
    slowest = max(r[4] for u in users for r in load.results[u.pk][1:])
    last_degraded = max((r[0] + r[4] for r in degraded), default=killed) - killed
    print(
        f"\nfailover {failover:.2f} s; {len(rows)} requests, {len(degraded)} degraded, the "
        f"last ending {last_degraded:.2f} s after the kill; slowest {slowest:.3f} s"
    )

    assert {r[1] for r in rows} == {200}  # no 5xx, no 429: fail-open, and budgets far away
    assert slowest < SLOWEST, slowest  # no request waits on the dead node
    for user in spared:  # enforced as ever: never degraded, remaining counts down
        results = load.results[user.pk]
        assert not any(r[2] for r in results), user.pk
        remaining = [int(r[3]) for r in results]
        assert remaining == sorted(set(remaining), reverse=True), remaining
    for user in hit:
        results = load.results[user.pk]
        flags = [r[2] for r in results]
        # Degraded only in one stretch after the kill, and enforced again for good after it.
        first = flags.index(True) if True in flags else len(flags)
        back = flags.index(False, first) if False in flags[first:] else len(flags)
        assert not any(flags[back:]), (user.pk, flags)
        assert all(r[0] >= killed - 0.01 for r in results[first:back])
        # Enforced again on the promoted replica: remaining counts down from below where it
        # was before the kill (the replica had the window).
        after = [int(r[3]) for r in results[back:]]
        assert len(after) >= 3 and after == sorted(set(after), reverse=True), after
        assert after[0] < int(results[first - 1][3])
    assert recovered < deadline, "the users of the killed master were not enforced again"
    # The failure policy lasts while the failover does, and at most until the dead node's
    # breaker lets a call through again (once a second): that call finds the new master.
    assert all(r[0] + r[4] <= promoted["at"] + BREAKER_RESET + SLOWEST for r in degraded)
    assert victim not in cluster.processes  # the dead node stayed dead: the app followed
    nodes = services.get_store().client.nodes_manager
    assert {nodes.get_node_from_slot(hash_slot(str(u.pk))).port for u in hit} == {promoted["port"]}

    services.flush_ledger_batch()
    ledger.flush_ledger()
    for user in users:  # every served request has exactly one ledger row
        assert UsageRecord.objects.filter(user=user).count() == len(load.results[user.pk])
    degraded_rows = UsageRecord.objects.filter(status="degraded")
    assert set(degraded_rows.values_list("user", flat=True)) <= {u.pk for u in hit}
    assert degraded_rows.count() == len(degraded)

    ledger.audit_windows()  # what the replica had not received yet comes from the ledger
    for user in users:
        budget = _figures_of(user)
        assert budget["used"] == ledger_total(user), user.pk
        assert budget["reserved"] == 0


def _figures_of(user: Any) -> dict[str, Any]:
    """``budget_for(user)`` once the store answers it: a read made while the cluster client
    is still refreshing its map of the nodes after the failover reports ``degraded`` (no
    figures; seen once in CI, for a user of a surviving master), and the next one answers."""
    deadline = time.monotonic() + 2 * BREAKER_RESET + 5
    budget = services.budget_for(user)
    while budget["degraded"] and time.monotonic() < deadline:
        time.sleep(0.2)
        budget = services.budget_for(user)
    assert not budget["degraded"], user.pk
    return budget
