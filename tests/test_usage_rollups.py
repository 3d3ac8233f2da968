"""Hourly usage rollups equal the ledger, whatever way its rows were written (one bulk batch,
a re-delivered batch, one row at a time after a conflict, the outbox sweep); retention deletes
ledger rows past their days and nothing else, and keeps the rollups."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from django.db import IntegrityError
from django.db.models import Count, Sum
from django.db.models.functions import TruncHour

from quotas import ledger, services
from quotas.engine import retention
from quotas.engine.retention import prune_ledger
from quotas.exceptions import QuotaExceeded
from quotas.models import Team, UsageRecord, UsageRollup, UserQuota
from quotas.tasks import prune_ledger_task, record_usage_task

pytestmark = pytest.mark.django_db

HOUR_MS = 3_600_000
NOW = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)


def payload(user: Any, tokens: int, *, model: str = "gpt-4o", hours_ago: int = 0, **extra: Any):
    """A settled record as ``services.settle`` sends it to the worker."""
    reserved = int(NOW.timestamp() * 1000) - hours_ago * HOUR_MS
    prompt = tokens // 3
    return {
        "request_id": f"{user.pk}/{uuid.uuid4().hex}",
        "scope": str(user.pk),
        "user_id": user.pk,
        "model": model,
        "estimated_tokens": tokens + 10,
        "prompt_tokens": prompt,
        "completion_tokens": tokens - prompt,
        "actual_tokens": tokens,
        "status": "settled",
        "reserved_at_ms": reserved,
        "settled_at_ms": reserved + 500,
        "team": "",
        "estimated_cost": tokens * 3,
        "cost": tokens * 2,
        **extra,
    }


def ledger_sums() -> dict[tuple[Any, ...], tuple[int, ...]]:
    rows = (
        UsageRecord.objects.annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .values("hour", "user_id", "team_id", "model")
        .annotate(
            n=Count("id"),
            i=Sum("prompt_tokens"),
            o=Sum("completion_tokens"),
            t=Sum("actual_tokens"),
            c=Sum("cost"),
        )
    )
    return {
        (r["hour"], r["user_id"], r["team_id"], r["model"]): (
            r["n"],
            r["i"] or 0,
            r["o"] or 0,
            r["t"],
            r["c"],
        )
        for r in rows
    }


def rollup_sums() -> dict[tuple[Any, ...], tuple[int, ...]]:
    rows = UsageRollup.objects.values("hour", "user_id", "team_id", "model").annotate(
        n=Sum("requests"),
        i=Sum("tokens_in"),
        o=Sum("tokens_out"),
        t=Sum("tokens"),
        c=Sum("cost"),
    )
    return {
        (r["hour"], r["user_id"], r["team_id"], r["model"]): (
            r["n"],
            r["i"],
            r["o"],
            r["t"],
            r["c"],
        )
        for r in rows
    }


@pytest.fixture
def people(make_plan: Any, make_user: Any) -> dict[str, Any]:
    pro = make_plan(slug=f"pro-{uuid.uuid4().hex[:6]}", tokens_per_hour=100_000)
    default = make_plan(slug=f"free-{uuid.uuid4().hex[:6]}", is_default=True)
    team = Team.objects.create(name="Crew", slug=f"crew-{uuid.uuid4().hex[:6]}", plan=pro)
    member = make_user(plan=pro)
    UserQuota.objects.filter(user=member).update(team=team)
    return {
        "pro": pro,
        "default": default,
        "team": team,
        "member": member,
        "solo": make_user(plan=pro),
        "free": make_user(),  # no UserQuota: the default plan
    }


def mixed_batch(people: dict[str, Any]) -> list[dict[str, Any]]:
    team = str(people["team"].pk)
    batch = []
    for hours_ago in (0, 0, 1, 5):
        batch.append(payload(people["member"], 300, hours_ago=hours_ago, team=team))
        batch.append(payload(people["solo"], 120, model="gpt-4o-mini", hours_ago=hours_ago))
        batch.append(payload(people["free"], 50, hours_ago=hours_ago))
    batch.append({**payload(people["free"], 70), "prompt_tokens": None, "completion_tokens": None})
    return batch


def test_a_bulk_batch_is_rolled_up_per_hour_user_team_plan_and_model(people):
    batch = mixed_batch(people)
    assert record_usage_task.apply(args=[batch]).get() == len(batch)
    assert rollup_sums() == ledger_sums()
    assert sum(r.requests for r in UsageRollup.objects.all()) == len(batch)
    member = UsageRollup.objects.filter(
        user=people["member"], hour=datetime(2026, 6, 1, 12, tzinfo=UTC)
    )
    [bucket] = member
    assert (bucket.requests, bucket.tokens, bucket.tokens_in, bucket.tokens_out) == (
        2,
        600,
        200,
        400,
    )
    assert (bucket.team_id, bucket.plan_id, bucket.cost) == (
        people["team"].pk,
        people["pro"].pk,
        1200,
    )
    plans = set(UsageRollup.objects.filter(user=people["free"]).values_list("plan_id", flat=True))
    assert plans == {people["default"].pk}  # a default-plan user has no UserQuota row
    # A record without provider usage counts its charged tokens, not tokens in or out.
    free_now = UsageRollup.objects.get(
        user=people["free"], hour=datetime(2026, 6, 1, 12, tzinfo=UTC)
    )
    assert (free_now.requests, free_now.tokens, free_now.tokens_in) == (3, 170, 32)


def test_a_replayed_batch_counts_nothing_twice(people):
    batch = mixed_batch(people)
    record_usage_task.apply(args=[batch]).get()
    before = rollup_sums()
    assert record_usage_task.apply(args=[batch]).get() == 0  # re-delivered: nothing new
    assert rollup_sums() == before
    # Half old, half new: only the new records are added.
    more = [payload(people["solo"], 40, model="gpt-4o-mini") for _ in range(3)]
    assert record_usage_task.apply(args=[batch[:5] + more]).get() == 3
    assert rollup_sums() == ledger_sums() != before


def test_rows_written_one_at_a_time_after_a_conflict_are_rolled_up_once(people):
    batch = mixed_batch(people)
    record_usage_task.apply(args=[batch[:4]]).get()
    # A concurrent writer won the race for some rows: the batch insert fails and the rows
    # are written one at a time, each rolled up in its own transaction if it was created.
    with mock.patch.object(
        UsageRecord.objects, "bulk_create", side_effect=IntegrityError("duplicate key")
    ):
        assert record_usage_task.apply(args=[batch]).get() == len(batch) - 4
    assert rollup_sums() == ledger_sums()
    assert sum(r.requests for r in UsageRollup.objects.all()) == len(batch)


def test_a_batch_the_database_rolls_back_adds_nothing_to_the_rollups(people):
    batch = mixed_batch(people)
    with (
        mock.patch("quotas.engine.rows.roll_up", side_effect=IntegrityError("boom")),
        mock.patch("quotas.engine.rows._set_aside"),
    ):
        record_usage_task.apply(args=[batch]).get()
    # Every row's transaction failed with its rollup: no row, and no rollup, was written.
    assert UsageRecord.objects.count() == 0 and UsageRollup.objects.count() == 0


def test_the_outbox_sweep_rolls_up_what_it_writes(make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=100_000))
    for _ in range(3):
        services.settle(
            services.reserve(user, 100, model="gpt-4o"), prompt_tokens=20, completion_tokens=30
        )
    # No task was sent (it would be after a commit): the records wait in the Redis outbox.
    assert UsageRollup.objects.count() == 0
    assert ledger.flush_ledger() == 3
    [bucket] = UsageRollup.objects.filter(user=user)
    assert (bucket.requests, bucket.tokens_in, bucket.tokens_out, bucket.tokens) == (3, 60, 90, 150)
    assert rollup_sums() == ledger_sums()


# -- retention -------------------------------------------------------------------------------


def aged(people: dict[str, Any], days: list[float]) -> list[str]:
    """One record per age (days before NOW) for the solo user; returns their ids."""
    batch = [payload(people["solo"], 10, hours_ago=int(d * 24)) for d in days]
    record_usage_task.apply(args=[batch]).get()
    return [p["request_id"] for p in batch]


def test_retention_off_by_default_deletes_nothing(people, quota_config):
    aged(people, [1, 40, 400])
    assert prune_ledger(now=NOW) == 0
    assert UsageRecord.objects.count() == 3


def test_retention_deletes_only_rows_past_their_days_in_batches_and_keeps_rollups(
    people, quota_config
):
    quota_config(LEDGER_RETENTION_DAYS=30)
    ids = aged(people, [0, 1, 29.5, 30.5, 31, 45, 90, 91, 365])
    rollups = rollup_sums()
    deleted: list[int] = []
    real = retention._delete_batch

    def spy(*args: Any) -> int:
        deleted.append(real(*args))
        return deleted[-1]

    with mock.patch.object(retention, "_delete_batch", spy):
        assert prune_ledger(now=NOW, batch_size=2) == 6
    assert deleted == [2, 2, 2, 0]  # one short transaction per batch; the last finds none
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == sorted(ids[:3])
    assert rollup_sums() == rollups  # every hour still counted
    assert sum(r.requests for r in UsageRollup.objects.all()) == 9
    assert prune_ledger(now=NOW) == 0


def test_the_beat_task_prunes_with_the_setting(people, quota_config):
    quota_config(LEDGER_RETENTION_DAYS=1)
    now = datetime.now(UTC)
    batch = [
        {
            **payload(people["solo"], 10),
            "reserved_at_ms": int((now - timedelta(hours=h)).timestamp() * 1000),
        }
        for h in (1, 23, 25, 200)
    ]
    record_usage_task.apply(args=[batch]).get()
    assert prune_ledger_task.apply().get() == 2
    assert (
        UsageRecord.objects.count() == 2
        and UsageRollup.objects.aggregate(n=Sum("requests"))["n"] == 4
    )


# -- refusals --------------------------------------------------------------------------------


def refuse(user: Any, times: int, tokens: int = 600) -> None:
    for _ in range(times):
        with pytest.raises(QuotaExceeded):
            services.reserve(user, tokens, model="gpt-4o")


def refusal_rows() -> dict[tuple[Any, ...], int]:
    rows = UsageRollup.objects.exclude(refused_by="")
    return {(r.user_id, r.model, r.refused_by, r.plan_id): r.refusals for r in rows}


def test_refusals_are_rolled_up_per_limit_and_a_second_run_counts_nothing_twice(
    make_plan, make_user
):
    plan = make_plan(tokens_per_hour=1000)
    user = make_user(plan=plan)
    services.reserve(user, 600, model="gpt-4o")
    refuse(user, 3)
    assert services.roll_up_refusals() == 1
    key = (user.pk, "gpt-4o", "user tokens per hour", plan.pk)
    assert refusal_rows() == {key: 3}
    assert services.roll_up_refusals() == 1 and refusal_rows() == {key: 3}  # set, not added
    refuse(user, 2)
    services.roll_up_refusals()
    assert refusal_rows() == {key: 5}
    # Usage and refusals add up per user and hour; the history shows both.
    [hour] = [b for b in services.usage_history(user.pk, "day") if b.requests or b.refusals]
    assert (hour.refusals, hour.requests) == (5, 0)  # the reservation is not settled yet


def test_refusals_wait_in_the_batch_when_batching_is_on(make_plan, make_user, quota_config):
    from quotas.engine.refusals import refusal_batcher

    quota_config(LEDGER_BATCH_SECONDS=3600)
    refusal_batcher()._pending.clear()
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    services.reserve(user, 600, model="gpt-4o")
    refuse(user, 4)
    services.roll_up_refusals()
    assert refusal_rows() == {}  # nothing sent yet: no Redis call in the request
    assert refusal_batcher().flush() == 4
    services.roll_up_refusals()
    assert sum(refusal_rows().values()) == 4


# -- backfill (an upgrade: a ledger without rollups) -----------------------------------------


def test_a_ledger_written_before_rollups_is_backfilled_once(people):
    from django.core.management import call_command

    batch = mixed_batch(people)
    record_usage_task.apply(args=[batch]).get()
    UsageRollup.objects.all().delete()  # as before the upgrade
    out = io.StringIO()
    call_command("quotas_backfill_rollups", stdout=out)
    assert "hourly bucket(s) rolled up" in out.getvalue()
    assert rollup_sums() == ledger_sums()
    plans = set(UsageRollup.objects.filter(user=people["free"]).values_list("plan_id", flat=True))
    assert plans == {people["default"].pk}
    assert ledger.backfill_rollups() == 0 and rollup_sums() == ledger_sums()  # nothing twice


def test_the_backfill_stops_at_the_first_hour_the_worker_rolled_up(people):
    old = [payload(people["solo"], 10, hours_ago=h) for h in (5, 6)]
    record_usage_task.apply(args=[old]).get()
    UsageRollup.objects.all().delete()
    record_usage_task.apply(args=[[payload(people["solo"], 7, hours_ago=1)]]).get()  # upgraded
    assert ledger.backfill_rollups() == 2
    assert rollup_sums() == ledger_sums()


def test_a_plan_deleted_under_the_worker_never_fails_the_ledgers_rows(people):
    record_usage_task.apply(args=[[payload(people["free"], 10)]]).get()  # plans remembered
    people["default"].delete()
    assert record_usage_task.apply(args=[[payload(people["free"], 20)]]).get() == 1
    assert rollup_sums() == ledger_sums()
