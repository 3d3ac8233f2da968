"""Reconciliation on real Redis and the configured database: expiry of unsettled reservations,
windows rebuilt after Redis lost them, the audit, the ledger tasks, signals and commands."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db.models import Sum
from django.test import override_settings

from quotas import ledger, services
from quotas.backends.redis import RedisWindowStore
from quotas.conf import quota_settings
from quotas.exceptions import QuotaExceeded, StoreUnavailable
from quotas.models import UsageRecord
from quotas.signals import (
    budget_threshold_crossed,
    quota_exceeded,
    reservation_expired,
    usage_settled,
)
from quotas.tasks import audit_windows_task, flush_ledger_task, record_usage_task
from tests.conftest import celery_conf, keys_of, quotas_settings
from tests.support import sleep_until_redis_ms

pytestmark = pytest.mark.django_db


# -- helpers --------------------------------------------------------------------------------
def flush_redis(redis_client: Any, prefix: str) -> None:
    """What a Redis restart without persistence does to this test's keys."""
    keys = keys_of(redis_client, prefix)
    assert keys, "the test should have windows to lose"
    redis_client.delete(*keys)


def ledger_total(user: Any) -> int:
    return UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"] or 0


def used(user: Any) -> int:
    return services.budget_for(user)["used"]


def sleep_past_deadline(redis_client: Any, *reservations: Any) -> None:
    """Wait, on Redis's clock (the one expiry uses), until every reservation is overdue."""
    ttl_ms = int(quota_settings.RESERVATION_TTL_SECONDS * 1000)
    sleep_until_redis_ms(redis_client, max(r.reserved_at_ms for r in reservations) + ttl_ms + 1)


@pytest.fixture
def received() -> Iterator[Callable[[Any], list[dict[str, Any]]]]:
    """``received(signal)``: the keyword arguments of every send of that signal."""
    connected: list[tuple[Any, Any]] = []

    def listen(signal: Any) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def receiver(sender: Any, **kwargs: Any) -> None:
            calls.append(kwargs)

        signal.connect(receiver, weak=False)
        connected.append((signal, receiver))
        return calls

    yield listen
    for signal, receiver in connected:
        signal.disconnect(receiver)


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=1000))


@pytest.fixture
def settled(on_commit: Any) -> Callable[..., Any]:
    """``settled(reservation, total_tokens=...)``: settle and write the ledger row now."""

    def settle(reservation: Any, **usage: Any) -> Any:
        with on_commit(execute=True):
            return services.settle(reservation, **usage)

    return settle


@pytest.fixture
def settle_fails(monkeypatch: Any) -> Callable[[], Any]:
    """``with settle_fails():`` every settle that reaches Redis fails as if Redis were down."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("Redis error: connection refused")

    @contextmanager
    def context() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(RedisWindowStore, "settle", fail)
            yield

    return context


# -- expiry ---------------------------------------------------------------------------------
def test_an_unsettled_reservation_is_charged_at_its_estimate_once(
    user, quota_config, received, settled, redis_client
):
    # (That it is not expired a millisecond before its deadline: the store's contract tests.)
    quota_config(RESERVATION_TTL_SECONDS=1)
    expired = received(reservation_expired)
    reservation = services.reserve(user, 400, model="gpt-4o")
    sleep_past_deadline(redis_client, reservation)

    assert ledger.flush_ledger() == 1
    assert ledger.flush_ledger() == 0
    row = UsageRecord.objects.get()
    assert (row.request_id, row.status, row.model) == (reservation.id, "expired", "gpt-4o")
    assert (row.estimated_tokens, row.actual_tokens, row.difference, row.user) == (
        400,
        400,
        0,
        user,
    )
    assert int(row.created_at.timestamp() * 1000) == reservation.reserved_at_ms
    assert expired == [
        {"signal": reservation_expired, "scope": str(user.pk),
         "reservation_id": reservation.id, "estimated_tokens": 400},
    ]  # fmt: skip
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (400, 0, 0)

    late = settled(reservation, total_tokens=10)  # the lost request comes back after all
    assert not late.settled_now
    assert UsageRecord.objects.count() == 1 and used(user) == 400


def test_a_sweep_that_dies_between_the_row_and_the_ack_charges_once(
    user, quota_config, received, monkeypatch, redis_client
):
    quota_config(RESERVATION_TTL_SECONDS=1)
    expired = received(reservation_expired)
    reservation = services.reserve(user, 250)
    sleep_past_deadline(redis_client, reservation)

    def die(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("worker killed")

    with monkeypatch.context() as patch:
        patch.setattr(RedisWindowStore, "ack_outbox", die)
        with pytest.raises(SystemExit):
            ledger.flush_ledger()
    store = services.get_store()
    assert [e.reservation_id for e in store.outbox(str(user.pk))] == [reservation.id]
    assert UsageRecord.objects.filter(request_id=reservation.id).count() == 1

    assert flush_ledger_task.delay().get() == 0  # the re-delivered task
    assert store.outbox(str(user.pk)) == []
    assert UsageRecord.objects.filter(request_id=reservation.id).count() == 1
    assert len(expired) == 1
    assert used(user) == 250


def test_many_overdue_reservations_are_swept_in_batches(user, quota_config, redis_client):
    quota_config(RESERVATION_TTL_SECONDS=1)
    reservations = [services.reserve(user, 10) for _ in range(7)]
    sleep_past_deadline(redis_client, *reservations)
    assert ledger.flush_ledger(batch=3) == 7
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == {
        r.id for r in reservations
    }


# -- Redis lost its data --------------------------------------------------------------------
def test_after_redis_lost_the_windows_a_blocked_user_is_still_blocked(
    user, settled, redis_client, isolated_quotas
):
    settled(services.reserve(user, 600), total_tokens=550)
    settled(services.reserve(user, 450))
    with pytest.raises(QuotaExceeded):
        services.reserve(user, 10)

    flush_redis(redis_client, isolated_quotas)

    assert services.budget_for(user)["remaining"] == 1000 - ledger_total(user) == 0
    with pytest.raises(QuotaExceeded) as refused:
        services.reserve(user, 10)
    assert refused.value.remaining == 0


def test_after_redis_lost_the_windows_the_budget_matches_the_ledger(
    user, settled, redis_client, isolated_quotas
):
    settled(services.reserve(user, 300), total_tokens=120)
    settled(services.reserve(user, 200), total_tokens=0)  # a refund
    flush_redis(redis_client, isolated_quotas)
    assert services.budget_for(user)["remaining"] == 1000 - ledger_total(user) == 880
    assert services.reserve(user, 880).remaining == 0


def test_a_rebuild_schedules_an_audit_for_usage_still_in_flight(
    user, settled, redis_client, isolated_quotas, on_commit, monkeypatch
):
    from quotas.tasks import audit_window_task

    sent: list[tuple[Any, Any]] = []
    monkeypatch.setattr(
        audit_window_task, "apply_async", lambda args, **kw: sent.append((args, kw["countdown"]))
    )
    settled(services.reserve(user, 300), total_tokens=120)
    with on_commit(execute=True):
        services.reserve(user, 10)  # the window exists: nothing to audit
    assert sent == []
    flush_redis(redis_client, isolated_quotas)
    with on_commit(execute=True):
        services.reserve(user, 10)  # rebuilt from the ledger
    assert sent == [([str(user.pk)], 2 * 5.0 + 5)]


def test_quotas_rebuild_seeds_lost_windows_from_the_ledger(
    make_plan, make_user, settled, redis_client, isolated_quotas
):
    plan = make_plan(tokens_per_hour=1000)
    alice, bob = make_user(plan=plan), make_user(plan=plan)
    settled(services.reserve(alice, 300), total_tokens=250)
    settled(services.reserve(bob, 100))
    flush_redis(redis_client, isolated_quotas)

    out = StringIO()
    call_command("quotas_rebuild", "--user", str(alice.pk), stdout=out)
    assert "1 window(s) rebuilt" in out.getvalue()
    store = services.get_store()
    assert sum(store.window_contents(str(alice.pk)).buckets.values()) == 250
    assert store.window_contents(str(bob.pk)).epoch == ""

    call_command("quotas_rebuild", stdout=out)  # every user with recent usage
    assert sum(store.window_contents(str(bob.pk)).buckets.values()) == 100
    assert ledger.rebuild_windows() == []  # nothing lost any more
    assert (used(alice), used(bob)) == (250, 100)


# -- the audit ------------------------------------------------------------------------------
@pytest.fixture
def dead_redis(isolated_quotas: str, dead_redis_url: str) -> Callable[[], Any]:
    """``with dead_redis():`` the quota store points at a port that refuses connections."""

    def context() -> Any:
        caches = {
            **settings.CACHES,
            "dead": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": dead_redis_url,
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
            },
        }
        quotas = quotas_settings(KEY_PREFIX=isolated_quotas, CACHE_ALIAS="dead")
        return override_settings(CACHES=caches, QUOTAS=quotas)

    return context


def test_the_audit_charges_usage_recorded_while_redis_was_down(user, settled, dead_redis):
    settled(services.reserve(user, 100))
    with dead_redis():
        degraded = services.reserve(user, 300)
        assert degraded.degraded
        settled(degraded, total_tokens=250)
    assert UsageRecord.objects.get(request_id=degraded.id).status == "degraded"
    assert used(user) == 100  # Redis never saw the degraded request

    outcomes = ledger.audit_windows()
    assert [(o.scope, o.adjusted) for o in outcomes] == [(str(user.pk), 250)]
    # A second run (a re-delivered task) adds nothing.
    assert audit_windows_task.delay().get() == {"windows": 0, "replayed": 0, "adjusted": 0}
    assert used(user) == ledger_total(user) == 350


def test_the_audit_replays_a_settle_that_never_reached_redis(
    user, settled, settle_fails, quota_config, redis_client
):
    quota_config(RESERVATION_TTL_SECONDS=1)
    reservation = services.reserve(user, 500)
    with settle_fails():
        assert settled(reservation, total_tokens=200).remaining is None  # ledger only
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"]) == (500, 500)

    [outcome] = ledger.audit_windows()
    assert (outcome.replayed, outcome.adjusted) == (1, 0)
    assert ledger.audit_windows() == []
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (200, 0, 0)
    sleep_past_deadline(redis_client, reservation)
    assert ledger.flush_ledger() == 0  # settled now: it never expires
    assert UsageRecord.objects.count() == 1 and used(user) == 200


def test_the_audit_lowers_an_old_bucket_charged_more_than_the_ledger_says(
    user, settled, settle_fails, quota_config, redis_client
):
    # The settle (a refund to 100) never reached Redis, and the reservation then expired at
    # its estimate: Redis holds 500 for a request the ledger says used 100.
    quota_config(RESERVATION_TTL_SECONDS=1, WINDOW_SECONDS=30, BUCKET_SECONDS=1)
    reservation = services.reserve(user, 500)
    with settle_fails():
        settled(reservation, total_tokens=100)
    sleep_past_deadline(redis_client, reservation)
    assert ledger.flush_ledger() == 0  # the ledger already has the request's row
    assert used(user) == 500

    # Young buckets may still have rows in the task queue: not lowered yet.
    assert ledger.audit_windows(settle_grace_seconds=60) == []
    # With no grace, a bucket is lowered once it is older than the TTL (1 s of 1 s buckets).
    sleep_until_redis_ms(redis_client, (reservation.reserved_at_ms // 1000 + 2) * 1000)
    [outcome] = ledger.audit_windows(settle_grace_seconds=0)
    assert outcome.adjusted == -400
    assert ledger.audit_windows(settle_grace_seconds=0) == []
    assert used(user) == ledger_total(user) == 100


def test_the_audit_leaves_alone_usage_whose_row_is_still_queued(user, on_commit, settled):
    settled(services.reserve(user, 100))
    pending = services.reserve(user, 300)  # in flight: no row yet, held in Redis
    with on_commit() as queued:  # settled in Redis; the ledger task is not run yet
        services.settle(services.reserve(user, 200), total_tokens=150)
    assert ledger.audit_windows() == []
    assert used(user) == 100 + 300 + 150

    for callback in queued:
        callback()
    assert ledger.audit_windows() == []
    settled(pending, total_tokens=300)
    assert ledger.audit_windows() == []
    assert used(user) == ledger_total(user) == 550


def test_the_audit_counts_records_still_in_the_outbox_as_ledger_rows(user, on_commit, dead_redis):
    # 200 settled in Redis whose row is still queued (its record waits in the outbox), and 250
    # recorded while Redis was down: the audit adds exactly the 250.
    with on_commit() as queued:
        services.settle(services.reserve(user, 200))
    with dead_redis(), on_commit(execute=True):
        services.settle(services.reserve(user, 250))
    [outcome] = ledger.audit_windows()
    assert outcome.adjusted == 250
    assert used(user) == 450

    for callback in queued:
        callback()
    assert ledger.audit_windows() == []
    assert used(user) == 450 == ledger_total(user)


def test_raises_never_take_the_window_above_the_ledger_total(
    user, on_commit, dead_redis, redis_client
):
    # 200 in a young bucket that neither a row nor the outbox explains, and 250 recorded while
    # Redis was down: the audit cannot tell a record in flight from an over-charge, so it adds
    # only what the ledger's total allows, and the rest on a later run.
    with on_commit() as queued:
        services.settle(services.reserve(user, 200))
    redis_client.delete(services.get_store().keys(str(user.pk))[4])  # the outbox
    with dead_redis(), on_commit(execute=True):
        services.settle(services.reserve(user, 250))
    [outcome] = ledger.audit_windows()
    assert outcome.adjusted == 50
    assert used(user) == 250 == ledger_total(user)

    for callback in queued:
        callback()
    [outcome] = ledger.audit_windows()
    assert outcome.adjusted == 200
    assert used(user) == 450 == ledger_total(user)


def test_the_audit_skips_lost_windows(user, settled, redis_client, isolated_quotas):
    settled(services.reserve(user, 100))
    flush_redis(redis_client, isolated_quotas)
    assert ledger.audit_window(str(user.pk)).skipped


# -- the ledger tasks -----------------------------------------------------------------------
def test_the_audit_keeps_an_admin_reset(user, settled):
    settled(services.reserve(user, 100), total_tokens=600)
    pending = services.reserve(user, 300)
    services.reset_window(user)
    assert ledger.audit_windows() == []
    assert services.budget_for(user)["remaining"] == 1000
    settled(pending, total_tokens=50)  # reserved before the reset: its bucket is gone
    assert ledger.audit_windows() == []
    assert services.budget_for(user)["remaining"] == 1000


def test_a_redelivered_record_usage_task_never_counts_twice(user, on_commit):
    with on_commit() as queued:
        services.settle(services.reserve(user, 300), total_tokens=280)
    [write] = queued
    write()
    payload = UsageRecord.objects.values().get()
    task_payload = {
        "request_id": payload["request_id"], "scope": str(user.pk), "user_id": user.pk,
        "model": "", "estimated_tokens": 300, "prompt_tokens": None,
        "completion_tokens": None, "actual_tokens": 280, "status": "settled",
        "reserved_at_ms": int(payload["created_at"].timestamp() * 1000),
    }  # fmt: skip
    assert record_usage_task.apply(args=[[task_payload]]).get() == 0  # a batch of one
    assert record_usage_task.apply(args=[task_payload]).get() == 0  # a message of old
    assert UsageRecord.objects.count() == 1 and ledger_total(user) == 280
    assert ledger.flush_ledger() == 0  # the outbox copy was dropped with the first write
    assert services.get_store().outbox(str(user.pk)) == []


def test_every_scheduled_task_is_registered():
    from project.celery import app

    app.loader.import_default_modules()
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert names <= set(app.tasks)
    assert {"quotas.tasks.record_usage", "quotas.tasks.rebuild_windows"} <= set(app.tasks)


@pytest.fixture
def dead_broker() -> Iterator[list[int]]:
    """Celery publishes (with the project's broker options) to a broker that hangs up on
    every connection; yields the connection attempts made so far (a one-item list)."""
    from project.celery import app

    listener = socket.create_server(("127.0.0.1", 0))
    attempts = [0]

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            attempts[0] += 1
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()

    def drop_pools() -> None:
        app._pool = None
        app.amqp._producer_pool = None

    dead = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    with celery_conf(broker_url=dead, task_always_eager=False):
        drop_pools()
        yield attempts
    drop_pools()
    listener.close()


def test_with_the_broker_down_usage_is_written_directly_with_one_failed_publish(
    user, on_commit, dead_broker
):
    attempts = []
    for tokens in (100, 200, 300):
        reservation = services.reserve(user, tokens)
        with on_commit(execute=True):
            services.settle(reservation)
        attempts.append(dead_broker[0])
    assert ledger_total(user) == 600  # every row written directly
    # One connection for the first publish ("max_retries": 0: no reconnect loop); then the
    # broker's breaker is open and the next rows are written without trying the broker.
    assert attempts == [1, 1, 1]


# -- signals and commands -------------------------------------------------------------------
def test_signals_fire_for_refusals_settles_and_thresholds(user, settled, received):
    exceeded = received(quota_exceeded)
    usage = received(usage_settled)
    crossed = received(budget_threshold_crossed)
    settled(services.reserve(user, 700), total_tokens=650)
    assert crossed == []
    reservation = services.reserve(user, 200)  # 850 of 1000: crosses 80 %
    assert [(c["used"], c["limit"], c["threshold"]) for c in crossed] == [(850, 1000, 0.8)]
    with pytest.raises(QuotaExceeded):
        services.reserve(user, 400)
    assert [c["exception"].requested for c in exceeded] == [400]
    settled(reservation, total_tokens=180)
    settled(reservation, total_tokens=180)  # repeated: no second signal
    assert [(u["estimated_tokens"], u["actual_tokens"]) for u in usage] == [(700, 650), (200, 180)]


def test_quotas_budget_shows_the_budget_and_recent_usage(user, settled):
    reservation = services.reserve(user, 300, model="gpt-4o")
    settled(reservation, total_tokens=120)
    out = StringIO()
    call_command("quotas_budget", user.get_username(), stdout=out)
    text = out.getvalue()
    assert "remaining: 880" in text and "limit: 1000" in text
    assert reservation.id in text and "gpt-4o" in text
    by_id = StringIO()
    call_command("quotas_budget", str(user.pk), stdout=by_id)
    assert "remaining: 880" in by_id.getvalue()
