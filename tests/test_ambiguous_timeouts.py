"""The ambiguous timeout: a script ran in Redis but its reply never came back, so the caller
cannot know whether it did. A proxy in front of the test Redis swallows exactly that reply.

Whatever the caller then does (serve degraded, settle, settle again), no request is charged
twice, every request ends in exactly one ledger row, and the window agrees with the ledger
after the sweep and the audit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db.models import Sum

from quotas import ledger, services
from quotas.models import UsageRecord
from tests.support import RedisProxy

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(make_plan: Any, make_user: Any, proxied_redis: RedisProxy, on_commit: Any) -> Any:
    user = make_user(plan=make_plan(tokens_per_hour=1000))
    with on_commit(execute=True):  # the limits are cached in Redis: one script per reserve
        warm_up = services.reserve(user, 100)
        services.settle(warm_up, total_tokens=100)
    assert not warm_up.degraded, "Redis did not answer through the proxy within 1 s"
    return user


@pytest.fixture
def settled(on_commit: Any) -> Callable[..., Any]:
    def settle(reservation: Any, **usage: Any) -> Any:
        with on_commit(execute=True):
            return services.settle(reservation, **usage)

    return settle


def ledger_total(user: Any) -> int:
    return UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"] or 0


def assert_exact(user: Any, used: int, rows: int) -> None:
    """The sweep and the audit find nothing to add, and Redis agrees with the ledger."""
    assert ledger.flush_ledger() == 0
    assert ledger.audit_windows() == []
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (used, 0, 0)
    assert used == ledger_total(user)
    assert UsageRecord.objects.filter(user=user).count() == rows


def test_a_reserve_whose_reply_is_lost_is_served_degraded_and_charged_once(
    user, proxied_redis, settled
):
    proxied_redis.lose_next_reply()
    reservation = services.reserve(user, 300)
    assert proxied_redis.reply_lost.is_set()  # the script ran; its answer never arrived
    assert reservation.degraded  # fail-open: served, as when Redis is down
    assert services.budget_for(user)["reserved"] == 300  # but Redis did hold the tokens

    outcome = settled(reservation, total_tokens=120)
    assert outcome.settled_now
    assert not settled(reservation, total_tokens=120).settled_now
    row = UsageRecord.objects.get(request_id=reservation.id)
    assert (row.status, row.estimated_tokens, row.actual_tokens) == ("degraded", 300, 120)
    assert_exact(user, used=100 + 120, rows=2)


def test_a_settle_whose_reply_is_lost_is_recorded_once_and_charged_once(
    user, proxied_redis, settled
):
    reservation = services.reserve(user, 300)
    proxied_redis.lose_next_reply()
    outcome = settled(reservation, total_tokens=120)
    assert proxied_redis.reply_lost.is_set()
    assert outcome.remaining is None  # the caller cannot tell what Redis did
    again = settled(reservation, total_tokens=120)  # a caller that retries the settle
    assert not again.settled_now
    row = UsageRecord.objects.get(request_id=reservation.id)
    assert (row.status, row.estimated_tokens, row.actual_tokens) == ("settled", 300, 120)
    assert_exact(user, used=100 + 120, rows=2)


def test_a_lost_reply_is_never_sent_again_on_a_new_connection(user, proxied_redis):
    proxied_redis.lose_next_reply()
    first = services.reserve(user, 300)
    assert first.degraded
    # Had the store resent the timed-out call, the script would have run twice: the second
    # time as a reused id. Nothing but this one reservation is held.
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (400, 300, 1)
