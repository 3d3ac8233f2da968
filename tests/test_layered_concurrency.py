"""Exactness at every layer under load: 8 processes of 16 threads reserve at once for the
members of one team and for users outside it, against the team's pooled budget and a global
budget together. Nothing is ever admitted beyond a budget at any layer, and with demand
above both, the binding budget is used exactly."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from django.test import override_settings

from quotas import services
from quotas.exceptions import QuotaExceeded, StoreUnavailable
from quotas.models import GlobalLimit, Team, UserQuota

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROCESSES, THREADS, ATTEMPTS = 8, 16, 30
TOKENS = 10  # every request the same size, so a budget can be used to the token
TEAM_BUDGET, GLOBAL_BUDGET = 3_000, 5_000


def _hammer(args: tuple[list[Any], int]) -> tuple[dict[int, int], int]:
    """One process: 16 threads, each reserving for the users in turn; returns the tokens
    admitted per user and the calls that failed to reach Redis."""
    users, seed = args
    admitted: Tally[int] = Tally()
    failures = [0]
    lock = threading.Lock()

    def worker(n: int) -> None:
        for attempt in range(ATTEMPTS):
            user = users[(seed * THREADS + n + attempt) % len(users)]
            try:
                services.reserve(user, TOKENS)
            except QuotaExceeded:
                continue
            except StoreUnavailable:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                admitted[user.pk] += TOKENS

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(admitted), failures[0]


@contextmanager
def hammered(users: list[Any], quota_config: Any) -> Iterator[Tally[int]]:
    """Every process hammers ``users`` at once; yields the tokens admitted per user, with
    the same Redis still configured (to read its figures)."""
    # Patient sockets and fail-closed: this measures atomicity, not the failure policy (see
    # test_services' single-user version). The timeouts go in the URL: a pool of their own.
    url = settings.REDIS_URL
    url += ("&" if "?" in url else "?") + "socket_timeout=10&socket_connect_timeout=10"
    patient = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url}
    with override_settings(CACHES={**settings.CACHES, "patient": patient}):
        quota_config(FAILURE_POLICY="closed", CACHE_ALIAS="patient")
        services.config_changed()  # the team was set by a queryset update: no signal
        for user in users:
            services.reserve(user, 0)  # limits cached, counters built: children need no DB
        connections.close_all()  # children must not share the parent's database sockets
        with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
            results = pool.map(_hammer, [(users, seed) for seed in range(PROCESSES)])
        assert sum(failures for _, failures in results) == 0
        admitted: Tally[int] = Tally()
        for per_user, _ in results:
            admitted.update(per_user)
        yield admitted


def _members(make_plan: Any, make_user: Any, count: int) -> list[Any]:
    own = make_plan(tokens_per_hour=1_000_000)
    team = Team.objects.create(slug="t", name="T", plan=make_plan(tokens_per_hour=TEAM_BUDGET))
    members = [make_user(plan=own) for _ in range(count)]
    UserQuota.objects.filter(user__in=members).update(team=team)
    return members


def test_a_team_budget_is_used_exactly_and_never_more(make_plan, make_user, quota_config):
    members = _members(make_plan, make_user, 8)
    with hammered(members, quota_config) as admitted:
        assert sum(admitted.values()) == TEAM_BUDGET
        team = services.budget_for(members[0])["limits"]
        assert {e["name"]: e["used"] for e in team}["team-tokens-hour"] == TEAM_BUDGET


def test_no_layer_ever_admits_beyond_its_budget(make_plan, make_user, quota_config):
    members = _members(make_plan, make_user, 4)
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=3600, budget=GLOBAL_BUDGET)
    outsiders = [make_user(plan=make_plan(tokens_per_hour=1_000_000)) for _ in range(4)]
    users = members + outsiders
    with hammered(users, quota_config) as admitted:
        by_team = sum(admitted[user.pk] for user in members)
        everyone = sum(admitted.values())
        assert PROCESSES * THREADS * ATTEMPTS * TOKENS > 2 * GLOBAL_BUDGET
        assert by_team <= TEAM_BUDGET
        assert everyone == GLOBAL_BUDGET  # demand above it: used to the token, never beyond
        # Redis holds exactly what was admitted, at every layer.
        limits = {e["name"]: e["used"] for e in services.budget_for(members[0])["limits"]}
        assert limits["team-tokens-hour"] == by_team
        assert limits["global-tokens-hour"] == everyone
        for user in users:
            assert services.budget_for(user)["used"] == admitted[user.pk]
