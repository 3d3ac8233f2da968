"""The admin's usage dashboard, usage-by-user list and user page (from the rollups, with
live budgets), and the ledger's sums and CSV export: checked through the test client by the
DOM they render."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from quotas import services
from quotas.exceptions import QuotaExceeded
from quotas.models import Team, UserQuota
from quotas.tasks import record_usage_task

pytestmark = pytest.mark.django_db


def record(
    user: Any,
    tokens: int,
    *,
    at: datetime | None = None,
    model: str = "gpt-4o",
    team: Any = None,
    cost: int = 0,
) -> str:
    at_ms = int((at or datetime.now(UTC)).timestamp() * 1000)
    rid = f"{user.pk}/{uuid.uuid4().hex}"
    payload = {
        "request_id": rid,
        "scope": str(user.pk),
        "user_id": user.pk,
        "model": model,
        "estimated_tokens": tokens,
        "prompt_tokens": tokens // 4,
        "completion_tokens": tokens - tokens // 4,
        "actual_tokens": tokens,
        "status": "settled",
        "reserved_at_ms": at_ms,
        "settled_at_ms": at_ms + 100,
        "team": str(team.pk) if team else "",
        "estimated_cost": cost,
        "cost": cost,
    }
    assert record_usage_task.apply(args=[[payload]]).get() == 1
    return rid


@pytest.fixture
def boss(django_user_model: Any) -> Client:
    user = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def traffic(make_plan: Any, make_user: Any) -> dict[str, Any]:
    pro = make_plan(slug="pro", name="Pro", tokens_per_hour=1_000_000)
    free = make_plan(slug="free", name="Free", tokens_per_hour=1000, is_default=True)
    team = Team.objects.create(name="Blue team", slug="blue", plan=pro)
    alice = make_user(plan=pro, username="alice")
    UserQuota.objects.filter(user=alice).update(team=team)
    bob = make_user(username="bob")  # the default plan: no UserQuota row
    now = datetime.now(UTC)
    record(alice, 4000, model="gpt-4o", team=team, cost=2_500_000)
    record(alice, 1000, model="gpt-4o-mini", team=team, at=now - timedelta(days=3), cost=10_000)
    record(bob, 120, model="gpt-4o-mini", cost=900)
    # Bob is near his hourly limit right now: 120 used (the window is seeded from the ledger)
    # and 780 reserved, 900 of 1000 live in Redis.
    services.reserve(bob, 780, model="gpt-4o-mini")
    for _ in range(2):  # and refused twice
        with pytest.raises(QuotaExceeded):
            services.reserve(bob, 500, model="gpt-4o-mini")
    services.roll_up_refusals()
    return {"pro": pro, "free": free, "team": team, "alice": alice, "bob": bob}


def section(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}".*?</(table|ul|div)>', html, re.S)
    assert match, f"no #{element_id}"
    return match.group(0)


def test_the_app_index_links_the_dashboard(boss):
    html = boss.get("/admin/quotas/").content.decode()
    assert 'href="/admin/quotas/dashboard/"' in html and "Usage dashboard" in html


def test_the_dashboard_shows_both_periods_top_spenders_near_limit_and_health(boss, traffic):
    response = boss.get("/admin/quotas/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    day, month = html.split('id="quota-month"')
    assert re.search(r'class="figure">4120</span><span class="label">tokens', day)
    assert re.search(r'class="figure">5120</span><span class="label">tokens', month)
    assert "$2.51" in month and "$2.50" in day  # 2,500,900 and 2,510,900 micro-dollars
    # Eight charts (tokens and cost, per plan and per model, for each period), SVG inline.
    assert html.count('<svg class="quota-chart"') == 8
    # No CDN, no chart library: the only scripts and styles are the admin's own.
    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/admin/") for a in assets)
    assert re.search(r"<title>\d\dh · gpt-4o: 4,000</title>", day)
    assert re.search(r"<title>\d\dh · Free: \$0.0009</title>", day)  # bob's plan: the default
    assert re.search(r"<title>\d\d \w+ · gpt-4o-mini: 1,000</title>", month)
    users = section(html, "quota-top-users")
    assert users.index("alice") < users.index("bob") and "$2.51" in users
    assert f"/admin/quotas/dashboard/user/{traffic['alice'].pk}/" in users
    assert "Blue team" in section(html, "quota-top-teams")
    near = section(html, "quota-near-limit")
    assert "bob" in near and "alice" not in near and "90%" in near
    refusals = section(html, "quota-refusals")
    assert re.search(r"<td>user tokens per hour</td><td class=\"num\">2</td>", refusals)
    assert re.search(r'class="figure">2</span><span class="label">refusals', day)
    health = section(html, "quota-health")
    assert "ok" in health and "Redis" in health


def test_an_empty_dashboard_renders(boss):
    html = boss.get("/admin/quotas/dashboard/").content.decode()
    assert "No usage yet." in html and "Nobody is near a limit." in html
    assert html.count('<svg class="quota-chart"') == 8


def test_usage_by_user_reaches_every_user_with_activity_default_plan_too(boss, traffic):
    html = boss.get("/admin/quotas/dashboard/users/").content.decode()
    rows = section(html, "quota-users-table")
    assert rows.index(">alice<") < rows.index(">bob<")  # the highest cost first
    assert "(2 users)" in html
    found = boss.get("/admin/quotas/dashboard/users/?q=bo").content.decode()
    assert ">bob<" in found and ">alice<" not in found


def test_a_users_page_shows_live_limits_last_day_and_recent_records(boss, traffic):
    bob = traffic["bob"]
    html = boss.get(f"/admin/quotas/dashboard/user/{bob.pk}/").content.decode()
    limits = section(html, "quota-limits")
    assert '<td class="num">900</td><td class="num">1000</td><td class="num">100</td>' in limits
    assert "90%" in limits and "Free" in html  # the default plan applies
    assert re.search(r"<title>\d\dh · completion: 90</title>", html)
    assert "gpt-4o-mini" in section(html, "quota-records")
    assert boss.get("/admin/quotas/dashboard/user/999999/").status_code == 404


def test_staff_without_the_permission_are_refused_and_others_sent_to_login(make_user, traffic):
    clerk = make_user(username="clerk", is_staff=True)
    client = Client()
    client.force_login(clerk)
    for url in ("/admin/quotas/dashboard/", "/admin/quotas/dashboard/users/",
                f"/admin/quotas/dashboard/user/{traffic['bob'].pk}/"):  # fmt: skip
        assert client.get(url).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_dashboard"))
    assert client.get("/admin/quotas/dashboard/").status_code == 200
    user = Client()
    user.force_login(traffic["bob"])
    assert user.get("/admin/quotas/dashboard/").status_code == 302


# -- the ledger's sums and export ------------------------------------------------------------


def test_the_ledger_change_list_sums_the_current_filter(boss, traffic):
    html = boss.get("/admin/quotas/usagerecord/").content.decode()
    sums = section(html, "quota-ledger-sums")
    assert "3 records" in sums and "<strong>5120</strong> tokens" in sums and "$2.51" in sums
    html = boss.get("/admin/quotas/usagerecord/?model=gpt-4o-mini").content.decode()
    sums = section(html, "quota-ledger-sums")
    assert "2 records" in sums and "<strong>1120</strong> tokens" in sums and "$0.01" in sums
    assert 'href="/admin/quotas/usagerecord/export/?model=gpt-4o-mini"' in html


def test_the_csv_export_streams_the_filtered_ledger(boss, traffic):
    record(traffic["alice"], 10, model='=HYPERLINK("x")')
    response = boss.get("/admin/quotas/usagerecord/export/?q=alice")
    assert response.streaming and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["actual_tokens"] for r in rows] == ["10", "4000", "1000"]  # newest first
    assert rows[0]["model"] == '\'=HYPERLINK("x")'  # never a formula in a spreadsheet
    assert {r["user_id"] for r in rows} == {str(traffic["alice"].pk)}
    assert rows[1]["cost"] == "2500000" and rows[1]["team_id"] == str(traffic["team"].pk)
    bad = boss.get("/admin/quotas/usagerecord/export/?created_at__gte=notadate")
    assert bad.status_code == 400


def test_the_csv_export_needs_the_ledgers_view_permission(make_user, traffic):
    clerk = make_user(username="clerk2", is_staff=True)
    client = Client()
    client.force_login(clerk)
    assert client.get("/admin/quotas/usagerecord/export/").status_code == 403


def test_the_user_quota_list_says_what_is_left_and_links_the_usage_page(boss, traffic):
    html = boss.get("/admin/quotas/userquota/").content.decode()
    alice = traffic["alice"]
    assert f'href="/admin/quotas/dashboard/user/{alice.pk}/">usage page</a>' in html
    assert re.search(r"4000 / 1000000 \(0 reserved\); 996000 left, full in \d+m\d\ds", html)
