"""The admin: plans editable by staff only, live usage, read-only ledger, actions."""

from __future__ import annotations

import pytest
from django.test import Client

from quotas import services
from quotas.models import Plan, UsageRecord, UserQuota

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]


@pytest.fixture
def staff(django_user_model):
    user = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


# The management form of the plan's extra-limits inline (what the browser sends with none).
NO_LIMITS = {"limits-TOTAL_FORMS": "0", "limits-INITIAL_FORMS": "0"}


def test_staff_edit_a_plan_and_the_next_request_uses_it(staff, make_plan, make_user, on_commit):
    plan = make_plan(slug="free", name="Free", tokens_per_hour=1000)
    user = make_user(plan=plan)
    services.reserve(user, 900)
    form = {
        "name": "Free",
        "slug": "free",
        "tier": 0,
        "tokens_per_hour": 5000,
        "default_output_tokens": 256,
        "is_active": "on",
        **NO_LIMITS,
    }
    with on_commit(execute=True):
        response = staff.post(f"/admin/quotas/plan/{plan.pk}/change/", form)
    assert response.status_code == 302
    assert services.reserve(user, 900).limit == 5000


def test_the_admin_refuses_a_cap_above_the_budget(staff):
    form = {
        "name": "Bad",
        "slug": "bad",
        "tier": 0,
        "tokens_per_hour": 100,
        "max_tokens_per_request": 500,
        "default_output_tokens": 10,
        "is_active": "on",
        **NO_LIMITS,
    }
    response = staff.post("/admin/quotas/plan/add/", form)
    assert response.status_code == 200
    assert "cannot exceed tokens_per_hour" in response.content.decode()
    assert not Plan.objects.filter(slug="bad").exists()


def test_non_staff_cannot_reach_the_admin(make_user):
    client = Client()
    client.force_login(make_user())
    response = client.get("/admin/quotas/plan/")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_user_quotas_show_live_usage(staff, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    services.reserve(user, 321)
    page = staff.get("/admin/quotas/userquota/").content.decode()
    assert "321 / 1000 (321 reserved)" in page


def test_reset_window_action(staff, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    services.reserve(user, 1000)
    quota = UserQuota.objects.get(user=user)
    staff.post(
        "/admin/quotas/userquota/", {"action": "reset_window", "_selected_action": [quota.pk]}
    )
    assert services.budget_for(user)["remaining"] == 1000


def test_move_to_plan_action(staff, make_plan, make_user, on_commit):
    small, big = make_plan(tokens_per_hour=1000), make_plan(tokens_per_hour=9000)
    user = make_user(plan=small)
    services.reserve(user, 10)
    quota = UserQuota.objects.get(user=user)
    with on_commit(execute=True):
        staff.post(
            "/admin/quotas/userquota/",
            {"action": "move_to_plan", "plan": big.pk, "_selected_action": [quota.pk]},
        )
    assert UserQuota.objects.get(user=user).plan == big
    assert services.reserve(user, 10).limit == 9000


def test_the_ledger_is_read_only_and_filterable(staff, make_plan, make_user, on_commit):
    user = make_user(plan=make_plan())
    with on_commit(execute=True):
        services.settle(services.reserve(user, 50, model="gpt-4"), total_tokens=20)
    record = UsageRecord.objects.get()
    assert staff.get("/admin/quotas/usagerecord/add/").status_code == 403
    listing = staff.get("/admin/quotas/usagerecord/?status__exact=settled&model=gpt-4")
    assert record.request_id in listing.content.decode()
    detail = staff.get(f"/admin/quotas/usagerecord/{record.pk}/change/")
    assert detail.status_code == 200 and b'name="_save"' not in detail.content
    assert staff.post(f"/admin/quotas/usagerecord/{record.pk}/delete/").status_code == 403


# -- every invalid edit is a form error, never a 500 -------------------------------------------
def changelist_post(staff, plan, **fields):
    """Save the plans list view (``list_editable``) with one plan's row changed."""
    row = {
        "tokens_per_hour": plan.tokens_per_hour,
        "requests_per_minute": plan.requests_per_minute or "",
        "is_active": "on" if plan.is_active else "",
        **fields,
    }
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-MIN_NUM_FORMS": "0",
        "form-MAX_NUM_FORMS": "1000",
        "form-0-id": str(plan.pk),
        "_save": "Save",
        **{f"form-0-{name}": value for name, value in row.items() if value != ""},
    }
    return staff.post(f"/admin/quotas/plan/?id__exact={plan.pk}", data)


def test_the_list_view_refuses_a_budget_below_the_cap_as_a_form_error(staff, make_plan):
    plan = make_plan(tokens_per_hour=10_000, max_tokens_per_request=4_000)
    response = changelist_post(staff, plan, tokens_per_hour=3_000)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Please correct the error below." in page
    assert "Max tokens per request: The per-request cap (4000) cannot exceed" in page
    plan.refresh_from_db()
    assert plan.tokens_per_hour == 10_000


def test_the_list_view_refuses_deactivating_the_default_plan_as_a_form_error(staff, make_plan):
    plan = make_plan(is_default=True)
    response = changelist_post(staff, plan, is_active="")
    assert response.status_code == 200
    assert "Is default: The default plan must be active." in response.content.decode()
    plan.refresh_from_db()
    assert plan.is_active


def test_a_valid_list_edit_still_saves(staff, make_plan):
    plan = make_plan(tokens_per_hour=10_000, max_tokens_per_request=4_000)
    assert changelist_post(staff, plan, tokens_per_hour=5_000).status_code == 302
    plan.refresh_from_db()
    assert plan.tokens_per_hour == 5_000


def change_form(plan, **fields):
    form = {
        "name": plan.name,
        "slug": plan.slug,
        "tier": plan.tier,
        "tokens_per_hour": plan.tokens_per_hour,
        "default_output_tokens": plan.default_output_tokens,
        "is_active": "on",
        **NO_LIMITS,
        "fallback_models": "[]",
        "cache_hit_cost": "0",
        **fields,
    }
    return {name: value for name, value in form.items() if value is not None}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"is_default": "on", "is_active": None}, "The default plan must be active."),
        ({"max_tokens_per_request": 20_000}, "cannot exceed tokens_per_hour (10000)"),
        ({"tokens_per_hour": 0}, "greater than or equal to 1"),
        ({"tokens_per_hour": 2**64}, "less than or equal to"),
        ({"slug": "taken"}, "already exists"),
        ({"is_default": "on"}, "Only one plan can be the default plan."),
        ({"fallback_models": '"gpt-4o-mini"'}, "must be a JSON list of model names"),
        ({"fallback_models": '["gpt-4o-mini", "gpt-4o-mini"]'}, "must not repeat a model"),
        ({"fallback_models": "[1]"}, "must be non-empty strings"),
        ({"fallback_models": "[not json"}, "Enter a valid JSON."),
        ({"cache_hit_cost": "1.5"}, "less than or equal to 1"),
        ({"cache_hit_cost": "-0.1"}, "greater than or equal to 0"),
    ],
)
def test_the_change_form_answers_every_invalid_edit_with_a_form_error(
    staff, make_plan, fields, words
):
    make_plan(slug="taken", is_default=True)
    plan = make_plan(tokens_per_hour=10_000)
    response = staff.post(f"/admin/quotas/plan/{plan.pk}/change/", change_form(plan, **fields))
    assert response.status_code == 200
    assert words in response.content.decode()
    assert Plan.objects.get(pk=plan.pk).tokens_per_hour == 10_000


def test_the_change_form_saves_a_degradation_ladder(staff, make_plan):
    plan = make_plan()
    ladder = {"fallback_models": '["gpt-4o-mini", "gpt-3.5-turbo"]', "serve_from_cache": "on",
              "cache_hit_cost": "0.25", "defer_when_refused": "on"}  # fmt: skip
    response = staff.post(f"/admin/quotas/plan/{plan.pk}/change/", change_form(plan, **ladder))
    assert response.status_code == 302
    plan.refresh_from_db()
    assert plan.fallback_models == ["gpt-4o-mini", "gpt-3.5-turbo"]
    assert (plan.serve_from_cache, str(plan.cache_hit_cost), plan.defer_when_refused) == (
        True, "0.250", True)  # fmt: skip


def test_deferred_jobs_are_read_only_in_the_admin(staff, make_user):
    from datetime import timedelta

    from django.utils import timezone

    from quotas.models import DeferredJob

    job = DeferredJob.objects.create(
        user=make_user(), provider="p", request={"model": "m"},
        expires_at=timezone.now() + timedelta(hours=1),
    )  # fmt: skip
    assert staff.get("/admin/quotas/deferredjob/").status_code == 200
    assert staff.get("/admin/quotas/deferredjob/add/").status_code == 403
    page = staff.get(f"/admin/quotas/deferredjob/{job.pk}/change/")
    assert page.status_code == 200 and "Save" not in page.content.decode()
