"""Two sites on one Redis: their keys carry the cache alias's own namespace (KEY_PREFIX,
VERSION) before ``QUOTAS["KEY_PREFIX"]``, so their budgets never mix."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from quotas import ledger, services
from quotas.exceptions import QuotaExceeded
from quotas.models import UsageRecord
from tests.conftest import quotas_settings

pytestmark = pytest.mark.django_db


@pytest.fixture
def site(isolated_quotas: str, redis_client: Any) -> Iterator[Callable[..., Any]]:
    """``with site(KEY_PREFIX="a")``: the quotas of a site whose cache alias has these
    settings, on the same Redis and with the same ``QUOTAS["KEY_PREFIX"]`` as every other."""
    run = uuid.uuid4().hex[:8]
    used: list[str] = []

    @contextmanager
    def configure(**cache: Any) -> Iterator[None]:
        if cache.get("KEY_PREFIX"):
            cache["KEY_PREFIX"] = f"{cache['KEY_PREFIX']}-{run}"
            used.append(cache["KEY_PREFIX"])
        alias = {**settings.CACHES["default"], **cache}
        alias = {key: value for key, value in alias.items() if value is not None}
        caches = {**settings.CACHES, "site": alias}
        config = quotas_settings(KEY_PREFIX=isolated_quotas, CACHE_ALIAS="site")
        with override_settings(CACHES=caches, QUOTAS=config):
            services.reset_runtime()
            yield
        services.reset_runtime()

    yield configure
    for name in used:
        keys = list(redis_client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            redis_client.delete(*keys)


def test_two_cache_prefixes_on_one_redis_have_independent_budgets(site, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with site(KEY_PREFIX="site-a"):
        services.settle(services.reserve(user, 900), total_tokens=1000)
        with pytest.raises(QuotaExceeded):
            services.reserve(user, 1)
    with site(KEY_PREFIX="site-b"):
        assert services.budget_for(user)["used"] == 0
        assert services.reserve(user, 1000).remaining == 0
    with site(KEY_PREFIX="site-a"):
        assert services.budget_for(user)["used"] == 1000


def test_a_cache_version_is_a_namespace_too(site, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with site(KEY_PREFIX="site", VERSION=1):
        services.reserve(user, 1000)
    with site(KEY_PREFIX="site", VERSION=2):
        assert services.budget_for(user)["used"] == 0


def test_the_ledger_sweep_of_one_site_leaves_the_other_sites_records(site, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with site(KEY_PREFIX="site-a"):
        services.settle(services.reserve(user, 10), total_tokens=7)
    with site(KEY_PREFIX="site-b"):
        assert ledger.flush_ledger() == 0
    assert not UsageRecord.objects.exists()
    with site(KEY_PREFIX="site-a"):
        assert ledger.flush_ledger() == 1


def test_the_prefix_is_the_cache_key_of_the_quotas_prefix(site, isolated_quotas):
    with site(KEY_PREFIX="site-a", VERSION=3):
        prefix = services.get_store().prefix
    assert prefix.startswith("site-a-") and prefix.endswith(f":3:{isolated_quotas}")
    with site(KEY_PREFIX=None, VERSION=None, KEY_FUNCTION=None):
        assert services.get_store().prefix == isolated_quotas  # the bare prefix, as before


def test_a_prefix_with_glob_characters_finds_only_its_own_keys(redis_client):
    from dataclasses import replace

    from quotas.backends.redis import RedisWindowStore
    from quotas.core.types import WindowSpec
    from tests.core.test_redis_store import counters

    base = f"glob-{uuid.uuid4().hex[:8]}"
    spec = WindowSpec.from_seconds(60, 1)
    mine = RedisWindowStore(redis_client, prefix=f"{base}[1]*", spec=spec)
    other = RedisWindowStore(redis_client, prefix=f"{base}1x", spec=spec)  # "[1]*" matches it
    try:
        mine_counters = [replace(c, tag="7") for c in counters(other)]
        seeds = {1: ("e", [])}
        other.reserve("7", "7/r", mine_counters, [5], ttl_ms=60_000, primary=1, seeds=seeds)
        assert list(other.iter_scopes("p")) == ["7"]
        assert list(mine.iter_scopes("p")) == []
        assert list(mine.iter_window_keys()) == []
    finally:
        keys = list(redis_client.scan_iter(match=f"{base}*", count=1000))
        redis_client.delete(*keys)
