"""The rejected-attempts window in Redis (``attempt.lua`` and the reserve script's check),
with the clock injected: a sliding 60 s window, exact."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django_redis import get_redis_connection

from quotas.backends.redis import RedisWindowStore
from quotas.core.types import ReserveStatus, WindowSpec
from tests.core.test_redis_store import limits

T0 = 1_700_000_000_000


@pytest.fixture
def store() -> Any:
    client = get_redis_connection("default")
    prefix = f"test-attempts-{uuid.uuid4().hex[:8]}"
    yield RedisWindowStore(client, prefix=prefix, spec=WindowSpec.from_seconds(6, 0.5))
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def reserve(store: Any, tokens: int, at: int, allowed: int = 3, **kwargs: Any) -> Any:
    return store.reserve(
        "u1",
        f"u1/{at}-{tokens}",
        tokens,
        ttl_ms=60_000,
        limits=limits(**kwargs),
        epoch="e",
        attempts_limit=allowed,
        now_ms=at,
    )


def test_attempts_count_up_to_the_allowance_then_refuse_every_request(store):
    assert [store.record_attempt("u1", 3, now_ms=T0 + i) for i in range(2)] == [0, 0]
    assert reserve(store, 10, T0 + 10).allowed
    blocked = store.record_attempt("u1", 3, now_ms=T0 + 20)
    # The first attempt leaves the window when its 1 s bucket is 60 s old.
    assert blocked == 60.98
    refused = reserve(store, 10, T0 + 30)
    assert refused.status is ReserveStatus.OVER_ATTEMPTS
    assert refused.retry_after == 60.97
    assert store.peek("u1", now_ms=T0 + 30).used == 10  # the refusal charged nothing


def test_the_window_slides(store):
    for i in range(3):
        store.record_attempt("u1", 3, now_ms=T0 + i * 20_000)
    assert reserve(store, 10, T0 + 50_000).status is ReserveStatus.OVER_ATTEMPTS
    assert reserve(store, 10, T0 + 61_000).allowed  # the first attempt has left


def test_a_413_decided_by_the_reserve_counts_as_an_attempt(store):
    for i in range(3):
        result = reserve(store, 500, T0 + i, max_tokens_per_request=100)
        assert result.status is ReserveStatus.OVER_REQUEST_CAP
    assert reserve(store, 10, T0 + 5).status is ReserveStatus.OVER_ATTEMPTS


def test_no_allowance_means_no_check(store):
    for i in range(5):
        store.record_attempt("u1", 3, now_ms=T0 + i)
    assert reserve(store, 10, T0 + 10, allowed=0).allowed
