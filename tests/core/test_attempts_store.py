"""The rejected-attempts window in Redis (``attempt.lua`` and the reserve script's check),
with the clock injected: a sliding 60 s window, exact."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from django_redis import get_redis_connection

from quotas.backends.redis import RedisWindowStore
from quotas.core.decisions import DecisionStatus
from quotas.core.types import WindowSpec
from tests.core.test_redis_store import counters

T0 = 1_700_000_000_000


@pytest.fixture
def store() -> Any:
    client = get_redis_connection("default")
    prefix = f"test-attempts-{uuid.uuid4().hex[:8]}"
    yield RedisWindowStore(client, prefix=prefix, spec=WindowSpec.from_seconds(6, 0.5))
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def reserve(store: Any, tokens: int, at: int, allowed: int = 3) -> Any:
    return store.reserve(
        "u1",
        f"u1/{at}-{tokens}",
        [replace(c, tag="u1") for c in counters(store)],
        [tokens],
        ttl_ms=60_000,
        primary=1,
        tokens=tokens,
        seeds={1: ("e", [])},
        attempts_limit=allowed,
        now_ms=at,
    )


def ok(decision: Any) -> bool:
    return decision.status is DecisionStatus.ALLOWED


def test_attempts_count_up_to_the_allowance_then_refuse_every_request(store):
    assert [store.record_attempt("u1", 3, now_ms=T0 + i) for i in range(2)] == [0, 0]
    assert ok(reserve(store, 10, T0 + 10))
    blocked = store.record_attempt("u1", 3, now_ms=T0 + 20)
    # The first attempt leaves the window when its 1 s bucket is 60 s old.
    assert blocked == 60.98
    refused = reserve(store, 10, T0 + 30)
    assert refused.status is DecisionStatus.OVER_ATTEMPTS
    assert refused.retry_ms == 60_970
    peek = store.peek("u1", [replace(c, tag="u1") for c in counters(store)], now_ms=T0 + 30)
    assert peek.figures[0].total == 10  # the refusal charged nothing


def test_the_window_slides(store):
    for i in range(3):
        store.record_attempt("u1", 3, now_ms=T0 + i * 20_000)
    assert reserve(store, 10, T0 + 50_000).status is DecisionStatus.OVER_ATTEMPTS
    assert ok(reserve(store, 10, T0 + 61_000))  # the first attempt has left


def test_no_allowance_means_no_check(store):
    for i in range(5):
        store.record_attempt("u1", 3, now_ms=T0 + i)
    assert ok(reserve(store, 10, T0 + 10, allowed=0))


def test_a_counter_that_knows_its_window_empty_still_sees_every_attempt(store):
    """A reserve that read the attempts window leaves the primary counter its "no attempt
    counts after" moment, and skips the read while that is past; every attempt moves it."""
    window = store.keys("u1")[0]
    assert ok(reserve(store, 10, T0))
    assert store.client.hexists(window, "ab")
    for i in range(3):
        store.record_attempt("u1", 3, now_ms=T0 + 10 + i)
    refused = reserve(store, 10, T0 + 20)
    assert refused.status is DecisionStatus.OVER_ATTEMPTS
    assert refused.retry_ms == 60_980  # as when the window is always read
    assert ok(reserve(store, 10, T0 + 61_000))  # the attempts have left
    # A counter rebuilt while attempts count (here: peeked, then seeded) knows nothing of
    # them: the window is read again.
    for i in range(3):
        store.record_attempt("u1", 3, now_ms=T0 + 62_000 + i)
    store.client.delete(window)
    peek = store.peek(
        "u1",
        [replace(c, tag="u1") for c in counters(store)],
        primary=1,
        seeds={1: ("e2", [])},
        now_ms=T0 + 62_010,
    )
    assert peek.figures[0].total == 0
    assert reserve(store, 10, T0 + 62_020).status is DecisionStatus.OVER_ATTEMPTS
    # An admin reset forgets the attempts with the counter's "ab".
    store.reset("u1", [replace(c, tag="u1") for c in counters(store)])
    assert ok(reserve(store, 10, T0 + 62_030))
