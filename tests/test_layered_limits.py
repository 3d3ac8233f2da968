"""Layered limits through the public Python API, on real Redis: a plan's extra limits, a
team's pooled budget, global limits per model, cost from a price table; all decided at once,
all or nothing, corrected at settle, and reloaded everywhere when an admin edits them."""

from __future__ import annotations

import logging
import multiprocessing
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from quotas import services
from quotas.backends.scripts import ScriptRunner
from quotas.exceptions import QuotaExceeded, RequestTooLarge
from quotas.models import GlobalLimit, ModelPrice, PlanLimit, Team, UsageRecord, UserQuota

pytestmark = pytest.mark.django_db

BIG = 1_000_000


@pytest.fixture
def roomy(make_plan: Any) -> Any:
    """A plan that never refuses on its own hourly budget."""
    return make_plan(tokens_per_hour=BIG)


@pytest.fixture
def team(make_plan: Any) -> Team:
    return Team.objects.create(slug="acme", name="Acme", plan=make_plan(tokens_per_hour=1000))


def member(make_user: Any, plan: Any, team: Team | None) -> Any:
    user = make_user()
    UserQuota.objects.create(user=user, plan=plan, team=team)
    return user


def limits_of(user: Any) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in services.budget_for(user)["limits"]}


def test_a_team_pools_its_members_budget(make_user, roomy, team):
    first, second = member(make_user, roomy, team), member(make_user, roomy, team)
    services.reserve(first, 600)
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(second, 500)
    exc = refused.value
    assert (exc.limit_scope, exc.scope, exc.window) == ("team", "tokens", "hour")
    assert (exc.limit, exc.remaining, exc.requested) == (1000, 400, 500)
    assert "team tokens per hour" in str(exc)
    assert limits_of(second)["team-tokens-hour"]["used"] == 600
    assert services.budget_for(second)["team"] == {"slug": "acme", "name": "Acme"}
    services.reserve(second, 400)  # exactly what is left


def test_a_global_limit_counts_all_traffic_for_the_models_its_glob_matches(make_user, roomy):
    GlobalLimit.objects.create(
        name="TPM", metric="tokens", window_seconds=60, model="gpt-4o*", budget=500
    )
    one, two = make_user(plan=roomy), make_user(plan=roomy)
    services.reserve(one, 300, model="gpt-4o")
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(two, 300, model="gpt-4o-mini")
    exc = refused.value
    assert (exc.limit_scope, exc.window, exc.model) == ("global", "minute", "gpt-4o*")
    assert (exc.limit, exc.remaining) == (500, 200)
    services.reserve(two, 300, model="gpt-4")  # another model: that limit does not apply


def test_a_refusal_at_the_global_layer_charges_no_layer(make_user, roomy, team):
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=3600, budget=700)
    user = member(make_user, roomy, team)
    services.reserve(user, 600)
    before = {name: entry["used"] for name, entry in limits_of(user).items()}
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 200)  # fits the user and the team, not the global limit
    assert refused.value.limit_scope == "global"
    assert {name: entry["used"] for name, entry in limits_of(user).items()} == before
    assert before == {"tokens-hour": 600, "team-tokens-hour": 600, "global-tokens-hour": 600}


def test_a_plans_extra_limits_a_longer_window_and_a_request_count(make_plan, make_user):
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=86_400, budget=1500)
    PlanLimit.objects.create(plan=plan, metric="requests", window_seconds=3600, budget=3)
    user = make_user(plan=plan)
    services.reserve(user, 1000)
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 600)
    assert (refused.value.window, refused.value.remaining) == ("1d", 500)
    services.reserve(user, 10)
    services.reserve(user, 10)
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 10)
    exc = refused.value
    assert (exc.scope, exc.window, exc.limit, exc.remaining, exc.requested) == (
        "requests",
        "hour",
        3,
        0,
        1,
    )
    assert "requested 1 request," in str(exc)


def test_a_settle_corrects_every_layer(make_user, roomy, team, on_commit):
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=60, budget=BIG)
    user = member(make_user, roomy, team)
    with on_commit(execute=True):
        settlement = services.settle(services.reserve(user, 800), total_tokens=250)
    assert {name: e["used"] for name, e in limits_of(user).items()} == {
        "tokens-hour": 250,
        "team-tokens-hour": 250,
        "global-tokens-minute": 250,
    }
    assert settlement.state is not None and settlement.state.remaining == 750  # the team's
    record = UsageRecord.objects.get()
    assert (record.team_id, record.actual_tokens) == (team.pk, 250)


def prices() -> None:
    ModelPrice.objects.create(
        model="gpt-4o*", input_per_million=Decimal("2.50"), output_per_million=Decimal("10")
    )
    ModelPrice.objects.create(
        model="gpt-4o-mini*", input_per_million=Decimal("0.15"), output_per_million=Decimal("0.6")
    )


def test_cost_is_charged_from_the_estimate_and_corrected_at_settle(make_plan, make_user):
    prices()
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=10_000)
    user = make_user(plan=plan)
    # 1000 prompt tokens at $2.50/M and 500 output tokens at $10/M: 2500 + 5000 micro-dollars.
    first = services.reserve(user, 1500, model="gpt-4o", prompt_tokens=1000)
    assert first.estimated_cost == 7500
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 500, model="gpt-4o", prompt_tokens=200)  # 500 + 3000
    exc = refused.value
    assert (exc.scope, exc.window, exc.remaining, exc.requested) == ("cost", "month", 2500, 3500)
    assert "micro-dollars" in str(exc)
    services.settle(first, prompt_tokens=1000, completion_tokens=100)  # 2500 + 1000
    services.reserve(user, 500, model="gpt-4o", prompt_tokens=200)
    assert limits_of(user)["cost-month"]["used"] == 3500 + 3500


def test_the_price_at_reserve_time_wins_at_settle(make_plan, make_user, on_commit):
    prices()
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=BIG)
    user = make_user(plan=plan)
    reservation = services.reserve(user, 1000, model="gpt-4o", prompt_tokens=1000)
    with on_commit(execute=True):
        ModelPrice.objects.filter(model="gpt-4o*").update(input_per_million=Decimal("100"))
        ModelPrice.objects.get(model="gpt-4o*").save()  # an admin edit: the version bumps
    with on_commit(execute=True):
        services.settle(reservation, prompt_tokens=800, completion_tokens=0)
    assert UsageRecord.objects.get().cost == 2000  # 800 x $2.50/M, not the new $100/M
    assert limits_of(user)["cost-month"]["used"] == 2000


def test_a_model_without_a_price_is_never_free(make_plan, make_user, caplog):
    prices()
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=BIG)
    user = make_user(plan=plan)
    with caplog.at_level(logging.WARNING, logger="quotas"):
        first = services.reserve(user, 100, model="mystery-1", prompt_tokens=100)
        services.reserve(user, 100, model="mystery-1", prompt_tokens=100)
    assert first.estimated_cost == 250  # the highest listed input price, $2.50/M
    assert sum("mystery-1" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_a_request_over_a_whole_layer_can_never_fit(make_user, roomy, team):
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=60, budget=100_000)
    user = member(make_user, roomy, team)
    with pytest.raises(RequestTooLarge) as refused:
        services.reserve(user, 1500)
    exc = refused.value
    assert (exc.limit, exc.requested, exc.limit_scope) == (1000, 1500, "team")
    assert limits_of(user)["team-tokens-hour"]["used"] == 0


def test_a_membership_change_applies_on_the_next_request(make_user, roomy, team, on_commit):
    user = member(make_user, roomy, team)
    services.reserve(user, 900)
    with on_commit(execute=True):
        quota = UserQuota.objects.get(user=user)
        quota.team = None
        quota.save()
    services.reserve(user, 900)  # no team any more: only the user's own budget


def test_a_layered_reserve_is_one_round_trip_and_no_query(make_user, roomy, team):
    GlobalLimit.objects.create(name="g", metric="tokens", window_seconds=60, budget=BIG)
    PlanLimit.objects.create(plan=roomy, metric="tokens", window_seconds=86_400, budget=BIG)
    user = member(make_user, roomy, team)
    services.reserve(user, 1)  # loads the limits and builds the counters
    with (
        CaptureQueriesContext(connection) as queries,
        mock.patch.object(ScriptRunner, "run", autospec=True, side_effect=ScriptRunner.run) as run,
    ):
        reservation = services.reserve(user, 10)
    assert len(queries) == 0
    assert [call.args[1] for call in run.call_args_list] == ["reserve"]
    assert len(reservation.counters) == 4  # the user's hour and day, the team's, the global


def test_me_lists_every_limit_with_its_figures(make_user, roomy, team):
    PlanLimit.objects.create(plan=roomy, metric="cost", period="month", budget=5_000_000)
    user = member(make_user, roomy, team)
    services.reserve(user, 40)
    client = APIClient()
    client.force_authenticate(user)
    me = client.get("/quotas/me/").json()
    assert me["team"] == {"slug": "acme", "name": "Acme"}
    assert me["limit"] == BIG and me["used"] == 40  # the fields of earlier versions stand
    by_name = {entry["name"]: entry for entry in me["limits"]}
    assert set(by_name) == {"tokens-hour", "cost-month", "team-tokens-hour"}
    team_entry = by_name["team-tokens-hour"]
    assert (team_entry["scope"], team_entry["used"], team_entry["remaining"]) == ("team", 40, 960)
    assert by_name["cost-month"]["unit"] == "micro-dollars"


# -- every process reloads after an edit -------------------------------------------------------
def _child(pipe: Any, user: Any) -> None:
    """Another web process: reserves when told to, answers what happened."""
    try:
        while (tokens := pipe.recv()) is not None:
            try:
                services.reserve(user, tokens)
                pipe.send("ok")
            except QuotaExceeded as exc:
                pipe.send(f"refused:{exc.limit_scope}:{exc.limit}")
            except RequestTooLarge as exc:
                pipe.send(f"too large:{exc.limit}")
    finally:
        pipe.close()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_edits_apply_on_the_next_request_in_every_process(make_plan, make_user):
    plan = make_plan(tokens_per_hour=1000)
    user = make_user(plan=plan)
    services.reserve(user, 1)  # the parent holds the limits too
    connections.close_all()
    parent_end, child_end = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(target=_child, args=(child_end, user))
    child.start()
    try:
        parent_end.send(500)
        assert parent_end.recv() == "ok"  # the child read and holds the limits now
        plan.tokens_per_hour = 600
        plan.save()  # an admin edit: every process reloads on its next decision
        parent_end.send(200)  # 701 fitted the old 1000, not the new 600
        assert parent_end.recv() == "refused:user:600"
        PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=86_400, budget=50)
        parent_end.send(60)  # more than the new day limit holds at all
        assert parent_end.recv() == "too large:50"
        plan.tokens_per_hour = 5000
        plan.save()
        PlanLimit.objects.filter(plan=plan).delete()
        parent_end.send(3000)
        assert parent_end.recv() == "ok"
    finally:
        parent_end.send(None)
        child.join(10)
