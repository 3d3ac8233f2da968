"""System checks refuse configurations that cannot work, with stable ids."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.checks import Error, Warning, run_checks
from django.test import override_settings

from quotas import checks


def quota_errors(**quotas):
    """The app's checks without its database ones (Django 6 runs those on every alias when
    ``databases`` is not given; Django 5.2 skipped them)."""
    with override_settings(QUOTAS={**settings.QUOTAS, **quotas}):
        return run_checks(tags=["quotas"], databases=[])


def test_the_demo_configuration_is_clean():
    assert quota_errors() == []


def test_missing_cache_alias():
    assert quota_errors(CACHE_ALIAS="nope") == [
        Error(checks.E001_MSG.format(alias="nope"), hint=checks.E001_HINT, id="quotas.E001")
    ]


def test_a_cache_that_is_not_shared_redis():
    caches = {
        **settings.CACHES,
        "local": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    with override_settings(CACHES=caches):
        errors = quota_errors(CACHE_ALIAS="local")
    backend = "django.core.cache.backends.locmem.LocMemCache"
    assert errors == [
        Error(
            checks.E002_MSG.format(alias="local", backend=backend),
            hint=checks.E002_HINT,
            id="quotas.E002",
        )
    ]


def test_bad_window_geometry_policy_numbers_and_typos():
    errors = quota_errors(
        WINDOW_SECONDS=100,
        BUCKET_SECONDS=30,
        FAILURE_POLICY="maybe",
        ALERT_THRESHOLD=2,
        WINDOW_SECONDZ=1,
    )
    assert [e.id for e in errors] == ["quotas.E003", "quotas.E004", "quotas.E005", "quotas.E006"]
    assert "multiple of BUCKET_SECONDS" in errors[0].msg
    assert errors[1].msg == checks.E004_MSG.format(value="maybe")
    assert errors[3].msg == checks.E006_MSG.format(keys="WINDOW_SECONDZ")


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("LEDGER_BATCH_SECONDS", -1, "a number of seconds, 0 or more"),
        ("LEDGER_BATCH_SECONDS", "0.05", "a number of seconds, 0 or more"),
        ("LEDGER_BATCH_SIZE", 0, "a positive integer"),
        ("LEDGER_BATCH_SIZE", 2.5, "a positive integer"),
        ("LEDGER_BACKLOG_WARN_SECONDS", 0, "a positive number of seconds"),
        ("LEDGER_BACKLOG_CHECK_SECONDS", -1, "a number of seconds, 0 or more"),
        ("NUM_PROXIES", -1, "None or an integer, 0 or more"),
        ("NUM_PROXIES", "1", "None or an integer, 0 or more"),
        ("NUM_PROXIES", True, "None or an integer, 0 or more"),
    ],
)
def test_ledger_batch_settings_out_of_range(key, value, rule):
    errors = quota_errors(**{key: value})
    assert [(e.id, e.msg) for e in errors] == [
        ("quotas.E005", checks.E005_MSG.format(key=key, rule=rule, value=value))
    ]


@pytest.mark.urls("tests.enforced_urls")
def test_a_view_with_the_throttle_but_no_middleware_warns():
    middleware = [m for m in settings.MIDDLEWARE if "Quota" not in m]
    with override_settings(MIDDLEWARE=middleware):
        assert quota_errors() == [Warning(checks.W001_MSG, hint=checks.W001_HINT, id="quotas.W001")]


def test_throttle_without_the_middleware_warns():
    middleware = [m for m in settings.MIDDLEWARE if "Quota" not in m]
    rest = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_CLASSES": ["quotas.throttling.TokenQuotaThrottle"],
    }
    with override_settings(MIDDLEWARE=middleware, REST_FRAMEWORK=rest):
        assert quota_errors() == [Warning(checks.W001_MSG, hint=checks.W001_HINT, id="quotas.W001")]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("no.such.module.factory", "No module named 'no'"),
        ("quotas.conf.DEFAULTS", "it is not callable"),
    ],
)
def test_a_client_factory_that_cannot_make_clients_is_refused(path, error):
    [message] = quota_errors(LLM_CLIENT_FACTORY=path)
    assert message.id == "quotas.E008" and error in message.msg
    assert message.hint == checks.E008_HINT


@pytest.mark.django_db
def test_cost_limits_without_prices_warn(make_plan, make_user):
    from decimal import Decimal

    from django.utils import timezone

    from quotas.models import ModelPrice, PlanLimit, UsageRecord

    def price_warnings():
        found = run_checks(tags=["quotas"], databases=["default"])
        return [(m.id, m.msg) for m in found if m.id in ("quotas.W002", "quotas.W003")]

    plan = make_plan(tokens_per_hour=1000)
    assert price_warnings() == []  # no cost limit: prices do not matter
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=30_000)
    assert [id for id, _ in price_warnings()] == ["quotas.W002"]
    ModelPrice.objects.create(
        model="gpt-4*", input_per_million=Decimal(30), output_per_million=Decimal(60)
    )
    assert price_warnings() == []
    user = make_user(plan=plan)
    for model in ("gpt-4o", "mystery-model"):
        UsageRecord.objects.create(
            request_id=f"r-{model}", user=user, model=model, created_at=timezone.now()
        )
    ((id, msg),) = price_warnings()
    assert id == "quotas.W003" and "'mystery-model'" in msg and "gpt-4o" not in msg


@pytest.mark.parametrize("share", [0, -0.5, 1.5, "half", None, True, float("nan")])
def test_a_degraded_share_outside_0_to_1_is_refused(share):
    assert quota_errors(DEGRADED_SHARE=share) == [
        Error(checks.E009_MSG.format(value=share), hint=checks.E009_HINT, id="quotas.E009")
    ]


@pytest.mark.parametrize("share", [1, 1.0, 0.25, 0.001])
def test_a_degraded_share_from_0_to_1_passes(share):
    assert quota_errors(DEGRADED_SHARE=share) == []


@pytest.mark.parametrize("days", [0, -3, 1.5, True, "30"])
def test_a_ledger_retention_that_is_not_a_number_of_days_is_refused(days):
    assert quota_errors(LEDGER_RETENTION_DAYS=days) == [
        Error(checks.E013_MSG.format(value=days), hint=checks.E013_HINT, id="quotas.E013")
    ]


@pytest.mark.parametrize("days", [None, 1, 90])
def test_a_ledger_retention_of_whole_days_or_none_is_fine(days):
    assert quota_errors(LEDGER_RETENTION_DAYS=days) == []
