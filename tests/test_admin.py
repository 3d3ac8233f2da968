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
