"""``GET /quotas/me/usage/``: a user's own usage in hourly or daily buckets, from the rollups."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rest_framework.test import APIClient

from quotas.tasks import record_usage_task

pytestmark = pytest.mark.django_db


def record(user: Any, tokens: int, at: datetime, model: str = "gpt-4o") -> None:
    at_ms = int(at.timestamp() * 1000)
    payload = {
        "request_id": f"{user.pk}/{uuid.uuid4().hex}",
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
        "team": "",
        "estimated_cost": tokens,
        "cost": tokens * 5,
    }
    assert record_usage_task.apply(args=[[payload]]).get() == 1


@pytest.fixture
def users(make_plan: Any, make_user: Any) -> tuple[Any, Any]:
    plan = make_plan(tokens_per_hour=100_000)
    return make_user(plan=plan), make_user(plan=plan)


def client_of(user: Any) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_last_day_in_hours_newest_first_and_only_the_callers(users):
    me, other = users
    now = datetime.now(UTC)
    record(me, 100, now)
    record(me, 40, now, model="gpt-4o-mini")
    record(me, 200, now - timedelta(hours=3))
    record(me, 999, now - timedelta(hours=30))  # before the day
    record(other, 5000, now)
    body = client_of(me).get("/quotas/me/usage/?period=day").json()
    assert (body["period"], body["bucket"], body["count"]) == ("day", "hour", 24)
    results = body["results"]
    assert len(results) == 24 and results[0]["start"] > results[1]["start"]
    latest = results[0]
    assert (latest["requests"], latest["tokens"], latest["cost"]) == (2, 140, 700)
    assert (latest["tokens_in"], latest["tokens_out"]) == (25 + 10, 75 + 30)
    assert datetime.fromisoformat(latest["start"]) <= now < datetime.fromisoformat(latest["end"])
    assert results[3]["tokens"] == 200
    assert sum(b["tokens"] for b in results) == 340  # not the other user's, not day-old usage


def test_the_default_period_is_the_day(users):
    assert client_of(users[0]).get("/quotas/me/usage/").json()["period"] == "day"


def test_the_last_month_in_days_of_the_calendar_time_zone(users, quota_config):
    quota_config(TIME_ZONE="America/New_York")
    me, _ = users
    zone = ZoneInfo("America/New_York")
    now = datetime.now(UTC)
    today = now.astimezone(zone).date()
    three_days_ago = datetime.combine(today - timedelta(days=3), datetime.min.time(), zone)
    record(me, 300, three_days_ago + timedelta(hours=1))
    record(me, 50, three_days_ago - timedelta(hours=1))  # the evening before, New York time
    record(me, 7, now)
    record(me, 10_000, now - timedelta(days=31))  # before the month
    body = client_of(me).get("/quotas/me/usage/?period=month").json()
    assert (body["bucket"], body["count"]) == ("day", 30)
    days = {datetime.fromisoformat(b["start"]).astimezone(zone).date(): b for b in body["results"]}
    assert len(days) == 30 and min(days) == today - timedelta(days=29)
    assert days[today]["tokens"] == 7
    assert days[today - timedelta(days=3)]["tokens"] == 300
    assert days[today - timedelta(days=4)]["tokens"] == 50
    assert sum(b["tokens"] for b in body["results"]) == 357
    first = body["results"][-1]
    start = datetime.fromisoformat(first["start"]).astimezone(zone)
    assert (start.hour, start.minute) == (0, 0)  # midnight in New York


def test_pages(users):
    client = client_of(users[0])
    page = client.get("/quotas/me/usage/?period=day&page_size=10&page=3").json()
    assert page["count"] == 24 and len(page["results"]) == 4
    assert page["next"] is None and "page=2" in page["previous"]
    assert client.get("/quotas/me/usage/?page=9").status_code == 404


@pytest.mark.parametrize("period", ["week", "", "DAY", "x" * 5000])
def test_a_bad_period_is_a_400_naming_the_parameter(users, period):
    response = client_of(users[0]).get("/quotas/me/usage/", {"period": period})
    assert response.status_code == 400
    [message] = response.json()["period"]
    assert "'day' or 'month'" in message and len(message) < 120


def test_anonymous_callers_are_refused():
    assert APIClient().get("/quotas/me/usage/").status_code in (401, 403)
