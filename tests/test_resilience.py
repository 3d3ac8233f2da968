"""The failure policy with Redis really down: a private ``redis-server`` this test stops,
freezes and restarts (the shared Redis is never touched)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from project.devtools.redis_server import RedisServer, start_private_redis
from quotas import services
from quotas.core.breaker import BreakerState
from quotas.exceptions import QuotaExceeded, RequestTooLarge, StoreUnavailable
from quotas.models import UsageRecord
from tests.conftest import quotas_settings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

SLOWEST_CALL = 1.0  # seconds: a dead Redis never holds a request longer


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: Any) -> Iterator[RedisServer]:
    server = start_private_redis(data_dir=tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def on_private_redis(private_redis: RedisServer, isolated_quotas: str) -> Iterator[Any]:
    """The quota store on the private server, with the project's 0.25 s socket timeouts and
    a breaker that probes again after 0.5 s."""

    @contextmanager
    def use(**quotas: Any) -> Iterator[RedisServer]:
        caches = {
            **settings.CACHES,
            "private": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": private_redis.url,
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
            },
        }
        config = quotas_settings(
            KEY_PREFIX=isolated_quotas,
            CACHE_ALIAS="private",
            BREAKER_RESET_SECONDS=0.5,
            **quotas,
        )
        with override_settings(CACHES=caches, QUOTAS=config):
            services.reset_runtime()
            yield private_redis
        services.reset_runtime()

    private_redis.start()
    return use


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Redis accepts connections but never answers (a hung host, not a refused port)."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - started


def serve_while(deadline: float, user: Any, tokens: int) -> tuple[list[Any], float]:
    """reserve + settle in a loop until ``deadline``: the reservations and the slowest call."""
    served, slowest = [], 0.0
    while time.monotonic() < deadline:
        reservation, took = timed(services.reserve, user, tokens)
        served.append(reservation)
        _, took_settle = timed(services.settle, reservation, total_tokens=tokens // 2)
        slowest = max(slowest, took, took_settle)
        time.sleep(0.02)
    return served, slowest


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    plan = make_plan(tokens_per_hour=100_000, max_tokens_per_request=500)
    return make_user(plan=plan)


def test_fail_open_serves_records_and_recovers_when_redis_is_stopped(user, on_private_redis):
    with on_private_redis() as server:
        before, _ = serve_while(time.monotonic() + 0.3, user, 100)
        server.stop()
        down, slowest = serve_while(time.monotonic() + 2.0, user, 100)
        server.start()  # empty, as after a restart without persistence
        time.sleep(0.6)  # the breaker's next probe
        after, _ = serve_while(time.monotonic() + 0.3, user, 100)

        assert slowest < SLOWEST_CALL
        assert all(r.degraded for r in down) and not any(r.degraded for r in after)
        assert services.get_breaker().state is BreakerState.CLOSED
        served = before + down + after
        rows = dict(UsageRecord.objects.values_list("request_id", "status"))
        assert set(rows) == {r.id for r in served}  # every served request has its row
        assert {rows[r.id] for r in down} == {"degraded"}
        # Enforcement resumed, with the lost window rebuilt from the ledger.
        assert services.budget_for(user)["used"] == 50 * len(served)


def test_fail_open_never_hangs_on_a_frozen_redis(user, on_private_redis):
    with on_private_redis() as server:
        services.reserve(user, 100)
        with frozen(server):
            down, slowest = serve_while(time.monotonic() + 1.5, user, 100)
        assert slowest < SLOWEST_CALL
        assert down and all(r.degraded for r in down)
        time.sleep(0.6)
        assert not services.reserve(user, 100).degraded


def test_the_per_request_cap_holds_while_degraded(user, on_private_redis):
    with on_private_redis() as server:
        server.stop()
        with pytest.raises(RequestTooLarge) as too_large:
            services.reserve(user, 501)
        assert too_large.value.limit == 500
        assert services.reserve(user, 500).degraded


def test_fail_closed_refuses_with_store_unavailable(user, on_private_redis):
    with on_private_redis(FAILURE_POLICY="closed") as server:
        server.stop()
        for _ in range(5):
            _, took = timed(pytest.raises, StoreUnavailable, services.reserve, user, 10)
            assert took < SLOWEST_CALL
        assert services.get_breaker().state is BreakerState.OPEN
        assert services.budget_for(user)["degraded"] is True
        server.start()
        time.sleep(0.6)
        assert not services.reserve(user, 10).degraded


def test_a_probe_that_fails_for_another_reason_does_not_shut_the_breaker_for_good(
    make_user, make_plan, on_private_redis
):
    planless = make_user()  # no plan and no default plan: reserve raises ConfigurationError
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with on_private_redis() as server:
        server.stop()
        for _ in range(3):
            services.reserve(user, 10)
        server.start()
        time.sleep(0.6)
        with pytest.raises(Exception, match="no default plan"):
            services.reserve(planless, 10)  # the half-open probe, which never reports
        time.sleep(0.6)
        assert not services.reserve(user, 10).degraded
        assert services.get_breaker().state is BreakerState.CLOSED


def test_enforcement_resumes_after_a_restart_for_a_user_over_budget(
    make_plan, make_user, on_private_redis
):
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with on_private_redis() as server:
        services.settle(services.reserve(user, 900))
        server.stop()
        server.start()
        time.sleep(0.6)
        with pytest.raises(QuotaExceeded):  # the lost window was rebuilt from the ledger
            services.reserve(user, 200)


def test_a_settle_batch_that_finds_redis_stopped_still_writes_every_row(user, on_private_redis):
    with on_private_redis(SETTLE_BATCH_SECONDS=3600) as server:
        served = [services.reserve(user, 100) for _ in range(3)]
        services._settler = None
        for reservation in served:
            services.settle_later(reservation, prompt_tokens=10, completion_tokens=20)
        server.stop()
        sent, took = timed(services.flush_settle_batch)
        server.start()
        services._settler = None

        assert sent == 3 and took < SLOWEST_CALL
        rows = UsageRecord.objects.filter(request_id__in=[r.id for r in served])
        assert sorted(rows.values_list("actual_tokens", "status")) == [(30, "settled")] * 3
        time.sleep(0.6)  # the breaker's next probe; the lost window is rebuilt from the rows
        assert services.budget_for(user)["used"] == 90
