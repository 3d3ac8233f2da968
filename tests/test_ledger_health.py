"""A host without a Celery worker must see it: the ledger's backlog (records waiting in the
Redis outboxes, and the age of the oldest) in ``GET /quotas/health/`` and ``quotas_health``,
and a warning logged at most once per check interval. The ledger sweep finds its work in the
registries the scripts keep, without scanning Redis."""

from __future__ import annotations

import logging
import time
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings
from rest_framework.test import APIClient

from quotas import ledger, services
from quotas.engine import health as health_module
from quotas.engine.health import BacklogWatch
from quotas.models import UsageRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=100_000))


def serve(user: Any, n: int = 1) -> None:
    """Settled requests whose records nobody writes: the tests' ledger tasks run only when a
    test asks (``on_commit``), as if no Celery worker were running."""
    for _ in range(n):
        services.settle(services.reserve(user, 100), total_tokens=60)


def health() -> Any:
    return APIClient().get("/quotas/health/")


# -- the sweep's registries ------------------------------------------------------------------
def test_the_sweep_finds_outboxes_and_overdue_reservations_without_scan(
    user, quota_config, monkeypatch
):
    quota_config(RESERVATION_TTL_SECONDS=0.2)
    serve(user, 2)
    services.reserve(user, 100)  # never settled: due after 0.2 s
    time.sleep(0.3)
    store = services.get_store()

    def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sweep scanned Redis")

    monkeypatch.setattr(type(store), "iter_scopes", no_scan)
    assert ledger.flush_ledger(scan=False) == 3
    statuses = sorted(UsageRecord.objects.values_list("status", flat=True))
    assert statuses == ["expired", "settled", "settled"]
    assert store.backlog() == (0, None)


def test_outboxes_from_before_the_registries_are_found_by_a_scan_once(user, redis_client):
    serve(user)
    store = services.get_store()
    redis_client.delete(store.backlog_key)  # as written by a version without registries
    assert ledger.flush_ledger(scan=False) == 0
    assert ledger.flush_ledger() == 1  # the first sweep on this prefix scans too
    serve(user)
    redis_client.delete(store.backlog_key)
    assert ledger.flush_ledger() == 0  # ... and the next ones do not, for a day


# -- the health endpoint and command ------------------------------------------------------------
def test_health_is_ok_with_nothing_waiting():
    response = health()
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "redis": "ok",
        "broker": "unknown",
        "ledger": {"outboxes_waiting": 0, "oldest_record_seconds": None, "warn_after_seconds": 60},
    }


def test_records_waiting_too_long_make_health_degraded(user, quota_config):
    quota_config(LEDGER_BACKLOG_WARN_SECONDS=0.2)
    serve(user, 3)
    fresh = health().json()
    assert (fresh["status"], fresh["ledger"]["outboxes_waiting"]) == ("ok", 1)
    time.sleep(0.3)
    response = health()
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["redis"]) == ("degraded", "ok")
    assert body["ledger"]["outboxes_waiting"] == 1
    assert body["ledger"]["oldest_record_seconds"] >= 0.2
    ledger.flush_ledger()  # a worker catches up
    assert health().status_code == 200


def test_health_is_degraded_while_redis_is_unreachable(quota_config):
    dead = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
    }
    with override_settings(CACHES={**settings.CACHES, "dead": dead}):
        quota_config(CACHE_ALIAS="dead")
        response = health()
    assert response.status_code == 503
    assert (response.json()["status"], response.json()["redis"]) == ("degraded", "unavailable")


def test_the_health_command_shows_the_backlog_and_fails_when_degraded(user, quota_config):
    out = StringIO()
    call_command("quotas_health", stdout=out)
    assert "ledger outboxes waiting: 0" in out.getvalue()
    quota_config(LEDGER_BACKLOG_WARN_SECONDS=0.1)
    serve(user)
    time.sleep(0.2)
    out = StringIO()
    with pytest.raises(CommandError, match="degraded"):
        call_command("quotas_health", stdout=out)
    assert "ledger outboxes waiting: 1" in out.getvalue()


# -- the warning ---------------------------------------------------------------------------------
def test_a_stale_backlog_is_logged_once_per_check_not_once_per_request(
    user, quota_config, caplog, monkeypatch
):
    quota_config(LEDGER_BACKLOG_WARN_SECONDS=0.05, LEDGER_BACKLOG_CHECK_SECONDS=0.2)
    watch = BacklogWatch()
    monkeypatch.setattr(health_module, "_watch", watch)  # the one settles start
    caplog.set_level(logging.WARNING, logger="quotas")
    try:
        watch.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # 1 s of steady traffic
            serve(user)
            time.sleep(0.02)
    finally:
        watch.stop()
    warnings = [r for r in caplog.records if "ledger outbox" in r.getMessage()]
    assert 2 <= len(warnings) <= 6  # about one per 0.2 s check, from one thread
    assert watch._thread is not None and watch._thread.name == "quotas-backlog-watch"
    assert "Is a Celery worker running" in warnings[0].getMessage()


def test_no_warning_while_the_ledger_keeps_up(user, quota_config, caplog):
    quota_config(LEDGER_BACKLOG_WARN_SECONDS=0.05)
    serve(user)
    ledger.flush_ledger()
    caplog.set_level(logging.WARNING, logger="quotas")
    time.sleep(0.1)
    assert BacklogWatch().check() is not None
    assert not [r for r in caplog.records if "ledger outbox" in r.getMessage()]
