"""Shared fixtures. Tests talk to the real Redis named by REDIS_URL (never fakeredis).

Every test gets its own QUOTAS key prefix, so tests never see each other's windows, and the
prefix's keys are deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from django_redis import get_redis_connection

from quotas import services


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """A test database of this run's own (``test_<name>_run<pid>``), so two runs on one
    machine (two checkouts, CI beside a developer) never create, flush or drop each other's."""
    from pytest_django.fixtures import _set_suffix_to_test_databases

    _set_suffix_to_test_databases(suffix=f"run{os.getpid()}")


def quotas_settings(**overrides: Any) -> dict[str, Any]:
    # One ledger task per settle, after commit, so a test sees its rows at once; the batched
    # path has its own tests (and the tests on real servers use it). No backlog watch thread
    # either (its own tests start one): it would call Redis in the middle of other tests.
    return {
        **settings.QUOTAS,
        "LEDGER_BATCH_SECONDS": 0,
        "LEDGER_BACKLOG_CHECK_SECONDS": 0,
        **overrides,
    }


@pytest.fixture
def redis_client() -> Any:
    return get_redis_connection("default")


@pytest.fixture(autouse=True)
def isolated_quotas(redis_client: Any) -> Iterator[str]:
    """A fresh key prefix (and fresh per-process store and breaker) for every test."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    with override_settings(QUOTAS=quotas_settings(KEY_PREFIX=prefix)):
        services.reset_runtime()
        yield prefix
    services.reset_runtime()
    keys = keys_of(redis_client, prefix)
    if keys:
        redis_client.delete(*keys)


def keys_of(redis_client: Any, prefix: str) -> list[Any]:
    """Every Redis key under a test's ``QUOTAS["KEY_PREFIX"]``, whatever namespace the cache
    alias puts before it (``demo:1:<prefix>:...``)."""
    return list(redis_client.scan_iter(match=f"*{prefix}:*", count=1000))


@contextmanager
def celery_conf(**options: Any) -> Iterator[None]:
    """Set options of the demo's Celery app (``task_always_eager=False``) for a block."""
    from project.celery import app

    saved = {name: getattr(app.conf, name) for name in options}
    _set_celery_options(app, options)
    try:
        yield
    finally:
        _set_celery_options(app, saved)


def _set_celery_options(app: Any, options: dict[str, Any]) -> None:
    for name, value in options.items():
        app.conf[name] = value
        # Celery before 5.7 reads an app configured from Django settings with a namespace
        # (CELERY_...) by the namespaced name first: an option set by its own name alone
        # would be ignored (and tasks published to the shared broker instead of run).
        app.conf[f"CELERY_{name.upper()}"] = value


@pytest.fixture(autouse=True)
def eager_celery() -> Iterator[None]:
    """Run queued tasks in-process, so nothing piles up in the shared broker. Tests that
    start a real worker turn this off (``with celery_conf(task_always_eager=False)``)."""
    with celery_conf(task_always_eager=True, task_eager_propagates=True):
        yield


@pytest.fixture
def quota_config(isolated_quotas: str) -> Callable[..., Any]:
    """``quota_config(WINDOW_SECONDS=6, BUCKET_SECONDS=0.5)`` within a test (same prefix)."""
    stack: list[Any] = []

    def apply(**overrides: Any) -> None:
        ctx = override_settings(QUOTAS=quotas_settings(KEY_PREFIX=isolated_quotas, **overrides))
        ctx.enable()
        stack.append(ctx)
        services.reset_runtime()

    yield apply
    while stack:
        stack.pop().disable()
    services.reset_runtime()


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks: Any) -> Any:
    """``with on_commit(execute=True):`` runs the ledger writes queued after commit."""
    return django_capture_on_commit_callbacks


@pytest.fixture
def make_plan(db: Any) -> Callable[..., Any]:
    from quotas.models import Plan

    def make(**fields: Any) -> Plan:
        slug = fields.pop("slug", f"plan-{uuid.uuid4().hex[:6]}")
        fields.setdefault("name", slug.title())
        fields.setdefault("tokens_per_hour", 10_000)
        return Plan.objects.create(slug=slug, **fields)

    return make


@pytest.fixture
def make_user(db: Any) -> Callable[..., Any]:
    from django.contrib.auth import get_user_model

    from quotas.models import UserQuota

    def make(plan: Any = None, override: int | None = None, **fields: Any) -> Any:
        username = fields.pop("username", f"user-{uuid.uuid4().hex[:8]}")
        user = get_user_model().objects.create_user(username=username, **fields)
        if plan is not None or override is not None:
            UserQuota.objects.create(user=user, plan=plan, tokens_per_hour_override=override)
        return user

    return make
