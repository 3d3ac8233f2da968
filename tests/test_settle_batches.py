"""``SETTLE_BATCH_SECONDS``: the middleware hands its settles to a per-process batch that goes
to Redis in one pipelined round trip, instead of settling in the request. Real Redis."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
from rest_framework.test import APIClient

from quotas import services
from quotas.backends import scripts as redis_backend
from quotas.engine import settlement
from quotas.models import ModelPrice, PlanLimit, UsageRecord

from .test_enforcement_http import BODY, ESTIMATE

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]


@pytest.fixture
def user(make_plan: Any, make_user: Any, quota_config: Any) -> Any:
    # An interval no test outlives (the tests send the batches), on a fresh batcher: a thread
    # of an earlier test's batcher may sleep through an hour-long interval.
    quota_config(SETTLE_BATCH_SECONDS=3600)
    settlement._settler = None
    yield make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))
    settlement._settler = None


@pytest.fixture
def client(user: Any) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def post(client: APIClient, url: str) -> Any:
    return client.post(url, BODY, format="json")


def used(client: APIClient) -> int:
    return client.get("/quotas/me/").json()["used"]


def test_settles_wait_for_the_batch_which_sends_them_in_one_round_trip(client, user, on_commit):
    first, second, third = (post(client, "/completion/") for _ in range(3))
    # Each response tells the budget after its own settle; earlier settles still in the
    # batch count at their estimate (1000 - 100 - 100 + 100 - 40): never more than is left.
    assert first["X-RateLimit-Remaining"] == "960"
    assert second["X-RateLimit-Remaining"] == "860"
    assert third["X-RateLimit-Remaining"] == "760"
    assert used(client) == 3 * ESTIMATE  # Redis holds the estimates until the batch goes
    assert UsageRecord.objects.count() == 0

    services.get_store().client.script_load(redis_backend.script_source("settle"))
    with (
        mock.patch.object(redis_backend, "_send_all", wraps=redis_backend._send_all) as sent,
        on_commit(execute=True),
    ):
        assert services.flush_settle_batch() == 3
    assert sent.call_count == 1  # one write, three replies
    assert used(client) == 3 * 40
    records = UsageRecord.objects.filter(user=user)
    assert (
        sorted((r.estimated_tokens, r.actual_tokens, r.status) for r in records)
        == [(ESTIMATE, 40, "settled")] * 3
    )


def test_a_failed_request_is_refunded_by_the_batch(client, on_commit):
    response = post(client, "/failing/")
    assert response.status_code == 502
    assert response["X-RateLimit-Remaining"] == "1000"
    with on_commit(execute=True):
        services.flush_settle_batch()
    assert used(client) == 0
    assert UsageRecord.objects.get().status == "refunded"


def test_a_view_that_settled_itself_is_not_settled_again(client, on_commit):
    with mock.patch.object(
        services.get_store(), "settle", wraps=services.get_store().settle
    ) as settle:
        response = post(client, "/explicit/")
    assert settle.call_count == 1  # the view's; the middleware neither sends nor queues one
    assert services.flush_settle_batch() == 0
    assert response["X-RateLimit-Remaining"] == "993"
    assert used(client) == 7


@pytest.mark.django_db(transaction=True)  # its rows are written by another thread
def test_the_batch_thread_sends_on_its_own(client, quota_config):
    quota_config(SETTLE_BATCH_SECONDS=0.05)
    settlement._settler = None
    post(client, "/completion/")
    deadline = time.monotonic() + 5
    # Its ledger row too: the thread writes it after the settle, and a row written after this
    # test's database flush would turn up in the next transactional test's database.
    while used(client) != 40 or not UsageRecord.objects.exists():
        assert time.monotonic() < deadline, "the settle never reached Redis and the ledger"
        time.sleep(0.02)


def test_a_settle_sent_twice_changes_nothing(client, user, on_commit):
    post(client, "/completion/")
    job = settlement._settle_batcher()._pending[0]
    settlement._settle_batcher()._pending.append(job)  # e.g. a pipeline sent again
    with on_commit(execute=True):
        assert services.flush_settle_batch() == 2
    assert used(client) == 40
    assert UsageRecord.objects.filter(user=user).count() == 1


def test_cost_limits_are_told_after_the_real_cost_too(user, make_plan, make_user, on_commit):
    """A settle still in the batch: the headers count the request's real cost, not its
    estimate's (as a settle in the request does); ``user`` turns the batch on."""
    ModelPrice.objects.create(
        model="gpt-4*", input_per_million=Decimal("30"), output_per_million=Decimal("60")
    )
    plan = make_plan(tokens_per_hour=1000, max_tokens_per_request=600)
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=1_000_000)
    api = APIClient()
    api.force_authenticate(make_user(plan=plan))
    response = post(api, "/completion/")
    # 11 prompt and 29 completion tokens (the view's usage) at $30 / $60 per million.
    assert f"r={1_000_000 - (11 * 30 + 29 * 60)};" in response["RateLimit"]
    with on_commit(execute=True):
        assert services.flush_settle_batch() == 1


def test_the_setting_is_checked(quota_config):
    from quotas.checks import check_settings

    quota_config(SETTLE_BATCH_SECONDS=-1)
    errors = check_settings()
    assert any("SETTLE_BATCH_SECONDS" in e.msg and e.id == "quotas.E005" for e in errors)


def test_settle_later_settles_at_once_when_batching_is_off(user, quota_config):
    quota_config(SETTLE_BATCH_SECONDS=0)
    reservation = services.reserve(user, 100)
    assert services.settle_later(reservation, total_tokens=30) == 30
    assert services.budget_for(user)["used"] == 30
    assert len(settlement._settle_batcher()) == 0
