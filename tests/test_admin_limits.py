"""The admin of layered limits: a plan's extra limits inline, teams with their members, global
limits and prices; impossible combinations are form errors (never a 500), and every edit
applies on the next request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from quotas import services
from quotas.exceptions import RequestTooLarge
from quotas.models import GlobalLimit, ModelPrice, PlanLimit, Team, UserQuota

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]


@pytest.fixture
def staff(django_user_model: Any) -> Client:
    user = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def plan_form(plan: Any, *limits: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The plan change form as a browser posts it, with these rows of extra limits."""
    form: dict[str, Any] = {
        "name": plan.name,
        "slug": plan.slug,
        "tier": plan.tier,
        "tokens_per_hour": plan.tokens_per_hour,
        "default_output_tokens": plan.default_output_tokens,
        "is_active": "on",
        "limits-TOTAL_FORMS": str(len(limits)),
        "limits-INITIAL_FORMS": "0",
        **fields,
    }
    for index, limit in enumerate(limits):
        row = {"metric": "tokens", "period": "sliding", "model": "", **limit}
        form.update({f"limits-{index}-{name}": value for name, value in row.items()})
    return form


def test_a_plans_extra_limit_added_inline_applies_on_the_next_request(
    staff, make_plan, make_user, on_commit
):
    plan = make_plan(tokens_per_hour=100_000)
    user = make_user(plan=plan)
    services.reserve(user, 10)
    day = {"window_seconds": 86_400, "budget": 500}
    with on_commit(execute=True):
        response = staff.post(f"/admin/quotas/plan/{plan.pk}/change/", plan_form(plan, day))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert PlanLimit.objects.get(plan=plan).budget == 500
    with pytest.raises(RequestTooLarge):
        services.reserve(user, 600)


@pytest.mark.parametrize(
    ("row", "fields", "words"),
    [
        ({"window_seconds": 100, "bucket_seconds": 30, "budget": 10}, {}, "multiple of its bucket"),
        ({"period": "sliding", "budget": 10}, {}, "needs its length"),
        ({"period": "month", "window_seconds": 60, "budget": 10}, {}, "no window length"),
        ({"window_seconds": 60, "budget": 100}, {"max_tokens_per_request": 500}, "per-request cap"),
        ({"window_seconds": 60, "budget": 10, "model": "gpt-[45]"}, {}, "Only the wildcards"),
        ({"window_seconds": 60, "bucket_seconds": 1, "budget": 0}, {}, "greater than or equal"),
    ],
)
def test_an_impossible_limit_is_a_form_error(staff, make_plan, row, fields, words):
    plan = make_plan(tokens_per_hour=100_000)
    response = staff.post(f"/admin/quotas/plan/{plan.pk}/change/", plan_form(plan, row, **fields))
    assert response.status_code == 200
    assert words in response.content.decode()
    assert not PlanLimit.objects.exists()


def test_raising_the_cap_above_an_existing_token_limit_is_refused(staff, make_plan):
    plan = make_plan(tokens_per_hour=100_000)
    PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=60, budget=300)
    response = staff.get(f"/admin/quotas/plan/{plan.pk}/change/")  # the inline row is shown
    assert response.status_code == 200
    # The list view edits the plan alone: the existing limit is checked from the database.
    changelist = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": str(plan.pk),
        "form-0-tokens_per_hour": "100000",
        "form-0-is_active": "on",
        "_save": "Save",
    }
    assert staff.post("/admin/quotas/plan/", changelist).status_code == 302
    plan.max_tokens_per_request = 500
    with pytest.raises(Exception, match="per-request cap"):
        plan.full_clean()


def test_a_team_and_its_members_from_the_admin(staff, make_plan, make_user, on_commit):
    pool = make_plan(slug="pool", tokens_per_hour=1000)
    members = [make_user(plan=make_plan(tokens_per_hour=100_000)) for _ in range(2)]
    quotas = [UserQuota.objects.get(user=user) for user in members]
    form = {
        "name": "Acme",
        "slug": "acme",
        "plan": str(pool.pk),
        "is_active": "on",
        "members-TOTAL_FORMS": "0",
        "members-INITIAL_FORMS": "0",
    }
    with on_commit(execute=True):
        assert staff.post("/admin/quotas/team/add/", form).status_code == 302
        team = Team.objects.get(slug="acme")
        for quota in quotas:
            quota.team = team
            quota.save()
    services.reserve(members[0], 700)
    with pytest.raises(Exception, match="team tokens per hour"):
        services.reserve(members[1], 400)
    page = staff.get(f"/admin/quotas/team/{team.pk}/change/").content.decode()
    assert members[0].username in page and members[1].username in page


def test_ambiguous_price_globs_are_refused_and_prices_are_editable(staff):
    ModelPrice.objects.create(
        model="gpt-4o*", input_per_million=Decimal("2.5"), output_per_million=Decimal(10)
    )
    form = {"model": "gpt-4?o*", "input_per_million": "1", "output_per_million": "2"}
    response = staff.post("/admin/quotas/modelprice/add/", form)
    assert response.status_code == 200
    assert "ambiguous" in response.content.decode()
    form = {"model": "gpt-4o-mini*", "input_per_million": "0.15", "output_per_million": "0.6"}
    assert staff.post("/admin/quotas/modelprice/add/", form).status_code == 302
    assert staff.get("/admin/quotas/modelprice/").status_code == 200


def test_a_global_limit_with_an_impossible_window_is_a_form_error(staff):
    form = {
        "name": "TPM",
        "metric": "tokens",
        "period": "sliding",
        "window_seconds": "100",
        "bucket_seconds": "30",
        "model": "",
        "budget": "1000",
        "is_active": "on",
    }
    response = staff.post("/admin/quotas/globallimit/add/", form)
    assert response.status_code == 200
    assert "multiple of its bucket" in response.content.decode()
    form["bucket_seconds"] = "20"
    assert staff.post("/admin/quotas/globallimit/add/", form).status_code == 302
    listed = staff.get("/admin/quotas/globallimit/")
    assert listed.status_code == 200 and "TPM" in listed.content.decode()
    assert GlobalLimit.objects.get().window_seconds == 100
