"""Shared fixtures. Tests talk to the real Redis named by REDIS_URL (never fakeredis).

Every test gets its own QUOTAS key prefix, so tests never see each other's windows, and the
prefix's keys are deleted afterwards. That Redis is shared by every run on the machine: tests
never flush it (no FLUSHDB, FLUSHALL or SCRIPT FLUSH there); what must empty a whole server
uses ``private_redis``, a server of this run's own.

``--repeat N`` runs each selected test N times (how flaky tests are shown to be fixed, e.g.
``pytest --repeat 500 tests/test_gateway.py -k reset``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.test import override_settings
from django_redis import get_redis_connection

from project.devtools.redis_server import RedisServer, start_private_redis
from quotas import services
from tests.support import RedisProxy, refusing_port


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--repeat", type=int, default=1, metavar="N", help="run each selected test N times"
    )


def pytest_configure(config: Any) -> None:
    # A password hashed at Django's production cost takes about 0.35 s here; no test is about
    # hashing (they log in with force_login or the test-login view), and the admin tests
    # made a superuser each: about 16 s of every run of the suite, in each of CI's cells.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def pytest_generate_tests(metafunc: Any) -> None:
    count = metafunc.config.getoption("repeat")
    if count > 1:
        metafunc.fixturenames.append("repeat_step")
        metafunc.parametrize("repeat_step", range(count), indirect=True)


# The longest test files are collected first, then every other file that starts servers or
# waits in real time (marked integration or slow), then the rest: the processes of ``make
# test`` (one file runs whole in one process, each taking the next file as it finishes) start
# the long files first and fill the end with short ones, so both end at about the same time.
STARTED_FIRST = ("test_bench.py", "test_fuzz_gateway.py", "test_admin_dashboard_scale.py")
LONG_MARKS = ("integration", "slow")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    long_files = {
        item.path for item in items if any(item.get_closest_marker(m) for m in LONG_MARKS)
    }
    items.sort(  # stable: else as found
        key=lambda item: (item.path.name not in STARTED_FIRST, item.path not in long_files)
    )


@pytest.fixture
def repeat_step(request: Any) -> int:
    """Which of the ``--repeat`` runs this is."""
    return int(getattr(request, "param", 0))


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


@pytest.fixture(scope="session", autouse=True)
def patient_shared_redis() -> Iterator[None]:
    """In this process, calls to the shared Redis wait up to 5 s for an answer, not the
    demo's 0.25 s: one run's slow command (a large DEL, a SCRIPT FLUSH) holds every other
    run's calls for as long as it takes, and a test must not fail because another run was
    busy. Tests of timeouts use aliases of their own with the project's 0.25 s (django-redis
    keeps one pool per URL, made by the first caller: this fixture runs before any)."""
    default = settings.CACHES["default"]
    options = {**default.get("OPTIONS", {}), "SOCKET_CONNECT_TIMEOUT": 5, "SOCKET_TIMEOUT": 5}
    with override_settings(CACHES={**settings.CACHES, "default": {**default, "OPTIONS": options}}):
        yield


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


@pytest.fixture
def dead_redis_url() -> Iterator[str]:
    """A Redis URL nobody answers at: its port refuses connections for the whole test."""
    with refusing_port() as port:
        yield f"redis://127.0.0.1:{port}/0"


def default_namespace() -> dict[str, Any]:
    """The default cache alias's key namespace (``KEY_PREFIX``, ``VERSION``,
    ``KEY_FUNCTION``): another alias with it names the same quota keys."""
    default = settings.CACHES["default"]
    return {
        name: default[name] for name in ("KEY_PREFIX", "VERSION", "KEY_FUNCTION") if name in default
    }


@pytest.fixture
def dead_cache(dead_redis_url: str) -> Iterator[str]:
    """A django-redis cache alias ("dead") on ``dead_redis_url``, with the project's 0.25 s
    socket timeouts: ``quota_config(CACHE_ALIAS=dead_cache)`` makes Redis unreachable."""
    dead = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": dead_redis_url,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
        **default_namespace(),
    }
    with override_settings(CACHES={**settings.CACHES, "dead": dead}):
        yield "dead"


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: Any) -> Iterator[RedisServer]:
    """A ``redis-server`` of this run's own (the binary on PATH, as the shared one, on a free
    loopback port), for what the shared Redis must never see: SCRIPT FLUSH, stops, restarts.
    Tests that stop it start it again (``private_redis.start()`` is a no-op when running)."""
    server = start_private_redis(data_dir=tmp_path_factory.mktemp("private-redis"))
    yield server
    server.stop()


@pytest.fixture
def proxied_redis(quota_config: Callable[..., Any]) -> Iterator[RedisProxy]:
    """The quota store reaches the test Redis through a ``RedisProxy`` (same keys), so a
    test can lose a reply or cut the connection. Socket timeouts of 1 s: a lost reply costs
    that long, and no call that does get its reply (through the proxy's threads, on a busy
    machine) comes near it."""
    url = urlsplit(settings.REDIS_URL)
    proxy = RedisProxy(url.hostname or "127.0.0.1", url.port or 6379)
    proxied = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"{proxy.url}{url.path or '/0'}",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1.0, "SOCKET_TIMEOUT": 1.0},
        **default_namespace(),
    }
    with override_settings(CACHES={**settings.CACHES, "proxied": proxied}):
        quota_config(CACHE_ALIAS="proxied")
        yield proxy
    proxy.cut()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A real three-master Redis Cluster on loopback ports, for the whole session (see
    ``tests/cluster_support.py``); skipped only when this machine cannot start one."""
    from tests.cluster_support import ClusterUnavailable, LocalCluster

    try:
        cluster = LocalCluster().begin()
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start a Redis Cluster here: {exc}")
    yield cluster
    cluster.end()


@pytest.fixture
def on_cluster(redis_cluster: Any, quota_config: Callable[..., Any]) -> Iterator[Any]:
    """This test's quotas live on the session's Redis Cluster (``QUOTAS["REDIS_CLUSTER_URL"]``)."""
    quota_config(REDIS_CLUSTER_URL=redis_cluster.url)
    yield redis_cluster
    services.reset_runtime()
