"""Edges of the engine that only show when things happen in an unlucky order, through the
public API on real Redis and the configured database: a reused request id, an audit that
races a request or a rebuild, a degraded request settled before its window is rebuilt, and a
rebuild that must count the oldest bucket still in the window.

Tests that need several events in one time bucket use hour-long buckets and start at least
30 s before a bucket ends (``in_one_bucket``): no test waits on a bucket by wall clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db.models import Sum

from quotas import ledger, services
from quotas.models import UsageRecord
from tests.support import redis_ms, sleep_until_redis_ms

pytestmark = pytest.mark.django_db

HOUR_MS = 3_600_000


@pytest.fixture
def hour_buckets(quota_config: Any, redis_client: Any) -> None:
    """Two-hour windows of one-hour buckets, starting well inside a bucket."""
    quota_config(WINDOW_SECONDS=7200, BUCKET_SECONDS=3600)
    in_one_bucket(redis_client, HOUR_MS, margin_ms=30_000)


def in_one_bucket(client: Any, bucket_ms: int, margin_ms: int) -> None:
    """Return once Redis's clock is at least ``margin_ms`` before the end of its bucket."""
    now = redis_ms(client)
    if bucket_ms - now % bucket_ms < margin_ms:
        sleep_until_redis_ms(client, (now // bucket_ms + 1) * bucket_ms)


@pytest.fixture
def plan(make_plan: Any) -> Any:
    return make_plan(tokens_per_hour=1000)


@pytest.fixture
def user(plan: Any, make_user: Any) -> Any:
    return make_user(plan=plan)


def used(user: Any) -> int:
    return services.budget_for(user)["used"]


def ledger_total(user: Any) -> int:
    return UsageRecord.objects.filter(user=user).aggregate(t=Sum("actual_tokens"))["t"] or 0


@pytest.fixture
def settled(on_commit: Any) -> Callable[..., Any]:
    """``settled(reservation, total_tokens=...)``: settle and write the ledger row now."""

    def settle(reservation: Any, **usage: Any) -> Any:
        with on_commit(execute=True):
            return services.settle(reservation, **usage)

    return settle


@pytest.fixture
def redis_down(quota_config: Any, dead_cache: str, isolated_quotas: str) -> Any:
    """``with redis_down():`` the quota store's Redis refuses connections (fail-open)."""

    @contextmanager
    def down() -> Iterator[None]:
        quota_config(CACHE_ALIAS=dead_cache)
        try:
            yield
        finally:
            quota_config(CACHE_ALIAS="default")

    return down


def lose_window(redis_client: Any, user: Any) -> None:
    """What a Redis restart without persistence does to one user's keys."""
    redis_client.delete(*services.get_store().keys(str(user.pk)))


class AuditRace:
    """The store the audit uses, with ``between()`` run once right after the audit's read of
    the window: what other processes do while the audit consults the ledger."""

    def __init__(self, between: Callable[[], None]) -> None:
        self._store = services.get_store()
        self._between: Callable[[], None] | None = between

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def window_contents(self, scope: str, **kwargs: Any) -> Any:
        contents = self._store.window_contents(scope, **kwargs)
        between, self._between = self._between, None
        if between:
            between()
        return contents


# -- reservation ids ----------------------------------------------------------------------
def test_a_reused_request_id_is_refused_and_charges_nothing(user, settled, make_user, plan):
    first = services.reserve(user, 300, request_id="call-1")
    with pytest.raises(ValueError, match="already exists"):
        services.reserve(user, 500, request_id="call-1")
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (300, 300, 1)
    settled(first, total_tokens=100)
    assert used(user) == 100
    row = UsageRecord.objects.get()
    assert (row.request_id, row.estimated_tokens, row.actual_tokens) == (first.id, 300, 100)
    # Another user may use the same request id: ids are namespaced by the quota key.
    other = services.reserve(make_user(plan=plan), 0, request_id="call-1")
    assert other.id != first.id


# -- the audit against requests and rebuilds ----------------------------------------------
def test_a_charge_made_while_the_audit_reads_the_ledger_is_not_overwritten(
    user, settled, redis_down, hour_buckets
):
    settled(services.reserve(user, 100))
    with redis_down():  # 250 served and recorded while Redis was down: Redis lacks them
        settled(services.reserve(user, 300), total_tokens=250)
    assert (used(user), ledger_total(user)) == (100, 350)

    racing: list[Any] = []
    race = AuditRace(lambda: racing.append(services.reserve(user, 50)))
    outcome = ledger.audit_window(str(user.pk), store=race)
    # The bucket changed after the read: compare-and-set leaves it for the next audit.
    assert racing and outcome.adjusted == 0
    assert used(user) == 150
    assert ledger.audit_window(str(user.pk)).adjusted == 250
    assert used(user) == 400 == ledger_total(user) + 50  # the racing 50 are still held


def test_an_audit_read_before_a_rebuild_changes_nothing_after_it(
    user, settled, redis_down, redis_client, hour_buckets
):
    settled(services.reserve(user, 100))
    with redis_down():
        degraded = services.reserve(user, 300)  # served while Redis is down, not yet settled

    def redis_restarts_and_the_window_is_rebuilt() -> None:
        lose_window(redis_client, user)
        assert used(user) == 100  # GET /quotas/me/ rebuilds it from the ledger
        with redis_down():  # the degraded request ends on a process still without Redis
            settled(degraded, total_tokens=250)

    # The rebuilt bucket holds what the audit read (100), so only the window's epoch tells
    # the audit that its read belongs to a window that is gone.
    race = AuditRace(redis_restarts_and_the_window_is_rebuilt)
    outcome = ledger.audit_window(str(user.pk), store=race)
    assert outcome.adjusted == 0
    assert used(user) == 100
    assert ledger.audit_window(str(user.pk)).adjusted == 250  # a fresh audit repairs it
    assert used(user) == 350 == ledger_total(user)


def test_raises_never_take_the_window_above_the_ledger_total_across_buckets(
    user, on_commit, redis_client
):
    assert used(user) == 0  # the window exists (empty), so the audit looks at it
    # 250 recorded five minutes ago while Redis was down (another process's ledger row) ...
    earlier = datetime.fromtimestamp(redis_ms(redis_client) / 1000 - 300, tz=UTC)
    UsageRecord.objects.create(
        request_id=f"{user.pk}/served-degraded",
        scope=str(user.pk),
        user=user,
        estimated_tokens=300,
        actual_tokens=250,
        status="degraded",
        created_at=earlier,
        settled_at=earlier,
    )
    # ... and 200 in the current bucket that no row or outbox record explains yet (a row in
    # the task queue, its outbox copy gone): the audit cannot tell it from an over-charge.
    with on_commit() as queued:
        services.settle(services.reserve(user, 200))
    redis_client.delete(services.get_store().keys(str(user.pk))[4])  # the outbox
    [outcome] = ledger.audit_windows()
    assert outcome.adjusted == 50  # the older bucket is raised only as far as the total allows
    assert used(user) == 250 == ledger_total(user)

    for callback in queued:
        callback()
    [outcome] = ledger.audit_windows()
    assert outcome.adjusted == 200
    assert used(user) == 450 == ledger_total(user)


# -- degraded requests --------------------------------------------------------------------
@pytest.mark.parametrize("usage", [{"total_tokens": 250}, {}])
def test_a_degraded_request_settled_before_its_window_is_rebuilt_keeps_its_ledger_row(
    user, settled, redis_down, redis_client, usage
):
    settled(services.reserve(user, 100))
    with redis_down():
        degraded = services.reserve(user, 300)
    assert degraded.degraded
    lose_window(redis_client, user)  # Redis came back empty
    outcome = settled(degraded, **usage)
    assert outcome.settled_now
    actual = usage.get("total_tokens", 300)  # no figures: the estimate stands
    row = UsageRecord.objects.get(request_id=degraded.id)
    assert (row.status, row.estimated_tokens, row.actual_tokens) == ("degraded", 300, actual)
    assert not settled(degraded, **usage).settled_now  # once
    assert UsageRecord.objects.count() == 2
    assert used(user) == 100 + actual == ledger_total(user)  # the rebuild seeds it


# -- rebuilds -----------------------------------------------------------------------------
def test_a_rebuilt_window_counts_the_oldest_bucket_still_in_it(user, redis_client):
    """Default geometry: an hour of one-minute buckets, so 61 buckets are live at once and
    the oldest one holds usage reserved more than an hour ago."""
    spec = services.window_spec()
    in_one_bucket(redis_client, spec.bucket_ms, margin_ms=10_000)
    current = redis_ms(redis_client) // spec.bucket_ms
    first_live = current - spec.window_ms // spec.bucket_ms
    rows = {
        "oldest-live": (first_live * spec.bucket_ms + 1, 70),  # more than an hour ago
        "left": (first_live * spec.bucket_ms - 1, 1000),  # its bucket has left the window
    }
    for name, (at_ms, tokens) in rows.items():
        at = datetime.fromtimestamp(at_ms / 1000, tz=UTC)
        UsageRecord.objects.create(
            request_id=f"{user.pk}/{name}",
            scope=str(user.pk),
            user=user,
            estimated_tokens=tokens,
            actual_tokens=tokens,
            status="settled",
            created_at=at,
            settled_at=at,
        )
    assert used(user) == 70  # the window did not exist: rebuilt from the ledger
    assert redis_ms(redis_client) // spec.bucket_ms == current, "the test overran its bucket"
