"""Contract tests of the Redis window store, on the real Redis, with an injected clock."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django_redis import get_redis_connection
from redis import Redis

from quotas.backends.redis import LedgerEntry, RedisWindowStore
from quotas.core.decisions import Counter, Decision, DecisionStatus
from quotas.core.limits import Limit, Metric, Scope, Window
from quotas.core.types import WindowSpec
from quotas.exceptions import StoreUnavailable
from tests.support import redis_ms

T0 = 1_800_000_000_000  # a bucket boundary for every bucket size used here
TTL = 600_000


def store_on(client: Any, window: float = 6, bucket: float = 0.5) -> Iterator[RedisWindowStore]:
    """A store under a fresh key prefix on ``client``'s Redis; its keys are deleted after."""
    prefix = f"test-store-{uuid.uuid4().hex[:8]}"
    yield RedisWindowStore(client, prefix=prefix, spec=WindowSpec.from_seconds(window, bucket))
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def store() -> Iterator[RedisWindowStore]:
    yield from store_on(get_redis_connection("default"))


@pytest.fixture
def private_store(private_redis: Any) -> Iterator[RedisWindowStore]:
    """A store on this run's private Redis: for tests that flush its script cache."""
    private_redis.start()
    yield from store_on(Redis.from_url(private_redis.url))


@dataclass(frozen=True)
class Plan:
    """The plan of the store tests' user "u": tokens per window, requests per minute,
    concurrent requests (0: none)."""

    tokens: int = 1000
    rpm: int = 0
    concurrency: int = 0


PLAN = Plan()


def counters(store: Any, plan: Plan = PLAN) -> list[Counter]:
    """The user's primary token counter (and requests counter)."""
    spec = store.spec
    hour = Window.sliding(spec.window_ms / 1000, spec.bucket_ms / 1000)
    found = [Counter("u", Limit(Scope.USER, Metric.TOKENS, plan.tokens, hour, counter="w"))]
    if plan.rpm:
        minute = Window.sliding(60, spec.rpm_bucket_ms / 1000)
        limit = Limit(Scope.USER, Metric.REQUESTS, plan.rpm, minute, counter="q")
        found.append(Counter("u", limit, seeded=False))
    return found


def amounts(plan: Plan, tokens: int) -> list[int]:
    """What one request of ``tokens`` charges to each of ``counters(store, plan)``."""
    return [tokens, 1] if plan.rpm else [tokens]


def reserve(
    store: Any,
    tokens: int,
    at: int | None,
    rid: str | None = None,
    *,
    plan: Plan = PLAN,
    epoch: str = "e",
    seed: Any = (),
    ttl: int = TTL,
    model: str = "",
) -> Decision:
    """Reserve for "u"; a window without an epoch is built (stamped ``epoch``, seeded with
    ``seed`` pairs) on the way."""
    return store.reserve(
        "u",
        rid or uuid.uuid4().hex,
        counters(store, plan),
        amounts(plan, tokens),
        ttl_ms=ttl,
        concurrency=plan.concurrency,
        primary=1,
        tokens=tokens,
        model=model,
        seeds={1: (epoch, list(seed))},
        now_ms=at,
    )


def allowed(decision: Decision) -> bool:
    return decision.status is DecisionStatus.ALLOWED


def settle(store: Any, rid: str, actual: int | None, at: int | None, **figures: Any) -> Any:
    figures.setdefault("epoch", "e")
    return store.settle(
        "u", rid, counters(store), actual_tokens=actual, primary=1, now_ms=at, **figures
    )


def peek(store: Any, at: int | None) -> Any:
    return store.peek("u", counters(store), primary=1, now_ms=at)


def used(store: Any, at: int | None) -> int:
    return peek(store, at).figures[0].total


def test_an_unbuilt_window_asks_to_be_seeded_and_charges_nothing(store: Any) -> None:
    decision = store.reserve("u", "a", counters(store), [10], ttl_ms=TTL, now_ms=T0)
    assert decision.status is DecisionStatus.NEEDS_SEED and decision.unbuilt == (1,)
    assert peek(store, T0).unbuilt == (1,)
    assert store.client.hgetall(store.keys("u")[3]) == {}  # no reservation recorded


def test_tokens_come_back_exactly_when_their_bucket_leaves_the_window(store: Any) -> None:
    assert allowed(reserve(store, 600, T0 + 100))  # bucket [T0, T0+500)
    assert allowed(reserve(store, 400, T0 + 2_600))  # bucket [T0+2500, T0+3000)
    # A bucket leaves when its end is a window (6 s) old: T0 + 6500. Never earlier, so no
    # token counts for less than a full window; not at a window boundary.
    assert not allowed(reserve(store, 600, T0 + 6_499))
    assert allowed(reserve(store, 600, T0 + 6_500))
    # The second bucket leaves at T0 + 3000 + 6000.
    assert not allowed(reserve(store, 400, T0 + 8_999))
    assert allowed(reserve(store, 400, T0 + 9_000))


def test_no_true_window_ever_holds_more_than_the_budget(store: Any) -> None:
    """Whatever the timing, tokens admitted within any 6 s stay within the budget."""
    admitted: list[tuple[int, int]] = []
    for i in range(400):
        at = T0 + i * 37  # every 37 ms, across bucket edges, for 14.8 s
        if allowed(reserve(store, 90, at)):
            admitted.append((at, 90))
    for start, _ in admitted:
        inside = sum(tokens for at, tokens in admitted if start <= at < start + 6_000)
        assert inside <= 1000


def test_a_rejected_reservation_consumes_nothing(store: Any) -> None:
    assert allowed(reserve(store, 900, T0))
    for _ in range(5):
        assert reserve(store, 200, T0 + 10).status is DecisionStatus.OVER_LIMIT
    snapshot = peek(store, T0 + 20)
    assert (snapshot.figures[0].total, snapshot.reserved) == (900, 900)
    assert allowed(reserve(store, 100, T0 + 30))


def test_retry_after_is_exact(store: Any) -> None:
    reserve(store, 300, T0 + 100)
    reserve(store, 300, T0 + 1_100)
    reserve(store, 300, T0 + 2_100)
    refused = reserve(store, 350, T0 + 3_000)
    assert (refused.status, refused.refusing) == (DecisionStatus.OVER_LIMIT, 1)
    # 350 needs 250 more tokens freed: the first bucket (300) leaves at T0 + 6500.
    assert refused.retry_ms == 3_500
    at = T0 + 3_000 + refused.retry_ms
    assert not allowed(reserve(store, 350, at - 500))  # one bucket earlier
    assert allowed(reserve(store, 350, at))


def test_retry_after_skips_buckets_that_do_not_free_enough(store: Any) -> None:
    reserve(store, 100, T0)
    reserve(store, 800, T0 + 1_000)
    refused = reserve(store, 500, T0 + 2_000)
    # Freeing the 100-token bucket is not enough; the 800-token one leaves at T0 + 7500.
    assert refused.retry_ms == 5_500


def test_settle_refund_returns_tokens_at_once(store: Any) -> None:
    reserve(store, 800, T0, rid="a")
    assert not allowed(reserve(store, 500, T0 + 10))
    settled = settle(store, "a", 200, T0 + 20)
    assert (settled.status, settled.applied, settled.figures[0].total) == (1, -600, 200)
    assert allowed(reserve(store, 500, T0 + 30))


def test_settle_extra_charge_past_the_limit_blocks_the_next_request(store: Any) -> None:
    reserve(store, 100, T0, rid="a")
    settled = settle(store, "a", 1_200, T0 + 10)
    assert settled.figures[0].total == 1_200  # 200 beyond the budget: debt
    refused = reserve(store, 1, T0 + 20)
    assert refused.status is DecisionStatus.OVER_LIMIT
    # The debt sits in the original bucket and ages out with it.
    assert refused.retry_ms == 6_480


def test_a_reused_reservation_id_is_refused_and_charges_nothing(store: Any) -> None:
    every = Plan(1000, rpm=10, concurrency=5)
    reserve(store, 300, T0, rid="a", plan=every)
    again = reserve(store, 500, T0 + 10, rid="a", plan=every)
    assert again.status is DecisionStatus.DUPLICATE_ID
    snapshot = store.peek("u", counters(store, every), primary=1, now_ms=T0 + 20)
    totals = [figure.total for figure in snapshot.figures]
    assert (totals, snapshot.reserved, snapshot.in_flight) == ([300, 1], 300, 1)
    # The first reservation stands as it was: settling it refunds from its own estimate.
    settled = settle(store, "a", 100, T0 + 30)
    assert (settled.estimate, settled.applied) == (300, -200)
    assert used(store, T0 + 40) == 100


def test_an_extra_charge_settled_later_goes_to_the_original_bucket_and_ages_out_with_it(
    store: Any,
) -> None:
    reserve(store, 100, T0 + 100, rid="a")  # bucket [T0, T0 + 500)
    reserve(store, 300, T0 + 3_000)  # bucket [T0 + 3000, T0 + 3500)
    settled = settle(store, "a", 700, T0 + 3_100)
    assert settled.applied == 600
    assert used(store, T0 + 3_200) == 1000
    # The 700 leave when the first bucket does (T0 + 6500), not with the settle's bucket.
    assert reserve(store, 1, T0 + 3_200).retry_ms == 3_300
    assert used(store, T0 + 6_499) == 1000
    assert used(store, T0 + 6_500) == 300


def test_a_refund_settled_later_goes_to_the_original_bucket_and_ages_out_with_it(
    store: Any,
) -> None:
    reserve(store, 800, T0 + 100, rid="a")
    reserve(store, 100, T0 + 3_000)
    settled = settle(store, "a", 200, T0 + 3_100)
    assert settled.applied == -600
    assert used(store, T0 + 3_200) == 300
    assert used(store, T0 + 6_500) == 100  # only the later 100 are left


def test_a_settle_reaches_the_oldest_bucket_still_in_the_window(store: Any) -> None:
    reserve(store, 800, T0, rid="a")
    late = settle(store, "a", 100, T0 + 6_499)  # its last live ms
    assert late.applied == -700
    assert used(store, T0 + 6_499) == 100


@pytest.fixture
def hour_store() -> Iterator[RedisWindowStore]:
    yield from store_on(get_redis_connection("default"), window=3600, bucket=60)


def test_the_keys_outlive_every_token_and_reservation_they_hold(hour_store: Any) -> None:
    """Real time (PEXPIRE counts in it): an hour of one-minute buckets, so a key expiring
    before its newest bucket leaves (up to a minute early) cannot go unseen."""
    store = hour_store
    result = reserve(store, 100, None, rid="a")
    window, pending, held = (store.keys("u")[i] for i in (0, 2, 3))
    before = redis_ms(store.client)  # no later than each PTTL read: a lower bound
    leaves_ms = result.now_ms + result.figures[0].reset_ms
    assert before + store.client.pttl(window) >= leaves_ms
    for key in (pending, held):
        assert before + store.client.pttl(key) >= result.now_ms + TTL


def test_settling_twice_changes_nothing(store: Any) -> None:
    reserve(store, 500, T0, rid="a")
    first = settle(store, "a", 100, T0 + 10)
    second = settle(store, "a", 100, T0 + 20)
    by_id = settle(store, "a", 999, T0 + 30, epoch="")
    assert first.status == 1 and second.status == 0 and by_id.status == 0
    assert used(store, T0 + 40) == 100


def test_a_refund_after_the_bucket_aged_out_changes_nothing(store: Any) -> None:
    reserve(store, 500, T0, rid="a")
    reserve(store, 300, T0 + 3_000)
    late = settle(store, "a", 0, T0 + 6_500)
    assert late.status == 1 and late.applied == 0
    assert used(store, T0 + 6_500) == 300


def test_settle_releases_the_concurrency_slot(store: Any) -> None:
    two = Plan(concurrency=2)
    reserve(store, 10, T0, rid="a", plan=two)
    reserve(store, 10, T0, rid="b", plan=two)
    refused = reserve(store, 10, T0, rid="c", plan=two)
    assert (refused.status, refused.in_flight) == (DecisionStatus.OVER_CONCURRENCY, 2)
    settle(store, "a", 10, T0 + 1)
    assert allowed(reserve(store, 10, T0 + 2, rid="c", plan=two))


def test_requests_per_minute_slide_and_report_retry_after(store: Any) -> None:
    rpm = Plan(10_000, rpm=3)
    for i in range(3):
        assert allowed(reserve(store, 1, T0 + i * 1_000, plan=rpm))
    refused = reserve(store, 1, T0 + 10_000, plan=rpm)
    assert (refused.status, refused.refusing) == (DecisionStatus.OVER_LIMIT, 2)
    assert refused.retry_ms == 51_000  # the first request leaves at T0 + 61 s
    assert not allowed(reserve(store, 1, T0 + 60_999, plan=rpm))
    assert allowed(reserve(store, 1, T0 + 61_000, plan=rpm))


def test_all_or_nothing_across_limits(store: Any) -> None:
    rpm = Plan(1000, rpm=1)
    assert allowed(reserve(store, 10, T0, plan=rpm))
    refused = reserve(store, 10, T0 + 1, plan=rpm)  # tokens fit, requests do not
    assert (refused.status, refused.refusing) == (DecisionStatus.OVER_LIMIT, 2)
    assert used(store, T0 + 2) == 10


def test_expired_reservations_move_to_the_outbox_once(store: Any) -> None:
    reserve(store, 100, T0, rid="a", ttl=1_000, model="gpt-4")
    assert store.expire("u", now_ms=T0 + 999) == 0
    assert store.expire("u", now_ms=T0 + 1_001) == 1
    expired = store.outbox("u")
    assert expired == [LedgerEntry("u", "a", "expired", 100, 100, T0, model="gpt-4")]
    assert store.expire("u", now_ms=T0 + 1_002) == 0
    assert store.outbox("u") == expired  # still waiting for its ack
    store.ack_outbox("u", ["a"])
    assert store.outbox("u") == []
    snapshot = peek(store, T0 + 1_004)
    assert (snapshot.figures[0].total, snapshot.reserved, snapshot.in_flight) == (100, 0, 0)


def test_a_settle_puts_its_ledger_record_in_the_outbox_once(store: Any) -> None:
    reserve(store, 100, T0, rid="a", model="ft:gpt:x")
    args = {"epoch": "", "status": "refunded", "prompt_tokens": 30}
    assert settle(store, "a", 30, T0 + 5, **args).status == 1
    assert settle(store, "a", 30, T0 + 5, **args).status == 0  # a repeat records nothing
    assert store.outbox("u") == [
        LedgerEntry("u", "a", "refunded", 100, 30, T0, T0 + 5, 30, None, "ft:gpt:x")
    ]


def test_a_settle_redis_no_longer_knows_records_the_callers_figures(store: Any) -> None:
    reserve(store, 10, T0, epoch="e1")
    args = {"epoch": "old", "estimate": 80, "reserved_at_ms": T0 - 5, "model": "m"}
    assert settle(store, "lost", 70, T0 + 1, **args).status == 2
    assert settle(store, "lost", 70, T0 + 2, **args).status == 0
    assert store.outbox("u") == [
        LedgerEntry("u", "lost", "settled", 80, 70, T0 - 5, T0 + 1, None, None, "m")
    ]


def test_a_settle_before_the_window_is_rebuilt_still_records_the_callers_figures(
    store: Any,
) -> None:
    # Redis lost everything (or the request was served while it was down): nothing can be
    # charged until the window is rebuilt, but the record must not be lost with it: the
    # outbox keeps it until its ledger row (which the rebuild then reads) is written.
    args = {"epoch": "old", "estimate": 80, "reserved_at_ms": T0 - 5, "model": "m"}
    assert settle(store, "lost", 70, T0 + 1, **args).status == 3
    assert settle(store, "lost", 70, T0 + 2, **args).status == 0  # once
    assert store.outbox("u") == [
        LedgerEntry("u", "lost", "settled", 80, 70, T0 - 5, T0 + 1, None, None, "m")
    ]


def test_a_lost_window_is_seeded_from_the_caller(store: Any) -> None:
    spec = store.spec
    seed = [(spec.bucket_of(T0 - 7_000), 999), (spec.bucket_of(T0 - 1_000), 700)]
    result = reserve(store, 200, T0, epoch="e2", seed=seed)
    assert allowed(result) and result.epoch == "e2"
    assert used(store, T0) == 900  # the 7 s old bucket is outside the window


def test_every_key_has_a_ttl_and_the_users_hash_tag(store: Any) -> None:
    reserve(store, 100, None, plan=Plan(rpm=5))
    keys = [*store.keys("u"), *store.counter_keys(counters(store, Plan(rpm=5)))]
    for key in keys:
        if store.client.exists(key):
            assert "{u}" in key
            assert store.client.pttl(key) > 0


def test_memory_after_1000_reservations_over_one_window(store: Any) -> None:
    rpm = Plan(10**9, rpm=10_000)
    for i in range(1_000):
        at = T0 + i * 6  # 1,000 reservations spread over the 6 s window
        reserve(store, 500, at, rid=f"r{i}", plan=rpm)
        settle(store, f"r{i}", 450, at + 3)
        if i % 100 == 99:  # the ledger flush drains the outbox every few seconds
            store.ack_outbox("u", [e.reservation_id for e in store.outbox("u", batch=1000)])
    assert store.outbox("u") == []
    assert store.memory_usage("u") <= 2048


def test_a_reservation_redis_lost_is_charged_once_however_often_it_is_settled(store: Any) -> None:
    reserve(store, 300, T0, rid="a", epoch="e1")
    store.client.delete(*store.keys("u"))  # Redis loses the window and the reservation
    reserve(store, 100, T0 + 10, epoch="e2")  # rebuilt (empty ledger), new epoch
    first = settle(store, "a", 250, T0 + 20, epoch="e1")
    again = settle(store, "a", 250, T0 + 30, epoch="e1")
    assert (first.status, first.applied, again.status) == (2, 250, 0)
    assert used(store, T0 + 40) == 350


# -- how the scripts reach Redis ---------------------------------------------------------------
def open_socket(connection: Any) -> bool:
    # Not ``connection.is_connected``: redis-py has it only from version 8.
    return connection._sock is not None


def test_scripts_run_on_one_connection_per_thread_not_the_pool(store: Any) -> None:
    import gc
    import threading
    import weakref

    reserve(store, 1, T0)
    reserve(store, 1, T0)
    mine = store.scripts._local.connection
    assert open_socket(mine)
    lent = store.client.connection_pool._in_use_connections
    assert mine not in lent and mine not in store.client.connection_pool._available_connections

    others = []

    def other_thread() -> None:
        reserve(store, 1, T0)
        others.append(store.scripts._local.connection)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert others and others[0] is not mine
    assert used(store, T0) == 3

    # A thread's connection goes when the thread does (no socket per finished thread).
    gone = weakref.ref(others.pop())
    gc.collect()
    assert gone() is None


def test_a_script_flushed_from_redis_is_sent_again(private_store: Any) -> None:
    store = private_store
    reserve(store, 10, T0)
    store.client.script_flush()  # this run's own server: the shared one is never flushed
    assert allowed(reserve(store, 10, T0))
    assert used(store, T0) == 20


def test_a_connection_the_server_closed_is_replaced_without_failing_the_call(store: Any) -> None:
    reserve(store, 10, T0)
    mine = store.scripts._local.connection
    mine.send_command("CLIENT", "ID")
    client_id = mine.read_response()
    store.client.client_kill_filter(_id=client_id)  # as a restart or an idle timeout would
    assert allowed(reserve(store, 10, T0))  # charged once: the first attempt never ran
    assert used(store, T0) == 20


def test_a_script_error_leaves_the_connection_usable(store: Any) -> None:
    reserve(store, 10, T0)
    mine = store.scripts._local.connection
    with pytest.raises(StoreUnavailable, match="Redis error"):  # no window length: Lua fails
        store.scripts.run("reserve", store.keys("u"), [str(T0), "not a number"])
    assert store.scripts._local.connection is mine and open_socket(mine)
    assert allowed(reserve(store, 10, T0))


def test_a_script_call_is_packed_as_its_connection_packs_it(store: Any) -> None:
    from redis.connection import PythonRespSerializer

    from quotas.backends.scripts import _pack

    pool = store.client.connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)
    command = ("EVALSHA", "a" * 40, 2, "q:{7}:w", "q:{7}:q", "", 3_600_000, "7/ab", "é", b"\x00")
    expected = b"".join(connection.pack_command(*command))
    assert b"".join(_pack(connection, command)) == expected
    # A connection that packs another way (no hiredis) is left to pack for itself.
    connection._command_packer = PythonRespSerializer(6000, connection.encoder.encode)
    assert b"".join(_pack(connection, command)) == expected


def test_a_forked_child_makes_its_own_connection(store: Any) -> None:
    import os

    reserve(store, 10, T0)
    parent_socket = store.scripts._local.connection._sock
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reserve, report whether it used the parent's socket
        try:
            ok = allowed(reserve(store, 10, T0))
            shared = store.scripts._local.connection._sock is parent_socket
            os.write(write, b"1" if ok and not shared else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert allowed(reserve(store, 10, T0))  # the parent's connection is still in step
    assert used(store, T0) == 30


def test_settle_many_is_each_settle_in_one_round_trip_even_after_a_script_flush(
    private_store: Any,
) -> None:
    store = private_store
    reserve(store, 300, T0, rid="a"), reserve(store, 300, T0, rid="b")
    store.client.set(store.keys("z")[3], "not a hash")  # scope z's script will fail
    store.client.script_flush()  # every call in the pipeline meets NOSCRIPT: sent again
    mine = counters(store)

    def one(scope: str, rid: str, actual: int) -> dict[str, Any]:
        return {"scope": scope, "reservation_id": rid, "counters": mine, "primary": 1,
                "actual_tokens": actual, "epoch": "e"}  # fmt: skip

    results = store.settle_many(
        [one("u", "a", 100), one("u", "b", 0), one("u", "a", 999), one("z", "c", 5)]
    )
    assert [r.status for r in results[:3]] == [1, 1, 0]  # the repeat changes nothing
    assert isinstance(results[3], StoreUnavailable)  # its script failed; the others stand
    assert used(store, T0) == 100


# -- the ledger registries: where the sweep's work is, and how old the backlog is -----------
def settle_at(store: Any, rid: str, at: int) -> Any:
    return settle(store, rid, 50, at)


def test_the_backlog_is_the_age_of_the_oldest_record_not_yet_written(store: Any) -> None:
    assert store.backlog(now_ms=T0) == (0, None)
    reserve(store, 100, T0, rid="a", epoch="e1")
    reserve(store, 100, T0, rid="b")
    assert store.backlog(now_ms=T0) == (0, None)  # reserved, not yet settled: no record
    settle_at(store, "a", T0 + 1_000)
    settle_at(store, "b", T0 + 4_000)
    assert store.backlog(now_ms=T0 + 10_000) == (1, 9.0)  # one outbox, since "a" was settled
    assert store.ack_outbox("u", ["a"], now_ms=T0 + 10_000) == 1
    assert store.backlog(now_ms=T0 + 10_000) == (1, 6.0)  # now since "b"
    assert store.ack_outbox("u", ["b"]) == 0
    assert store.backlog(now_ms=T0 + 10_000) == (0, None)
    assert list(store.backlog_scopes()) == []


def test_expired_reservations_are_due_then_waiting(store: Any) -> None:
    reserve(store, 100, T0, rid="a", epoch="e1")
    assert store.due_scopes(now_ms=T0 + TTL - 1) == []
    assert store.due_scopes(now_ms=T0 + TTL) == ["u"]
    assert store.expire("u", now_ms=T0 + TTL + 5) == 1
    assert store.due_scopes(now_ms=T0 + 10 * TTL) == []  # nothing pending any more
    assert store.backlog(now_ms=T0 + TTL + 2_005) == (1, 2.0)  # since it was moved
    assert list(store.backlog_scopes()) == ["u"]
    [entry] = store.outbox("u")
    assert (entry.status, entry.actual, entry.reserved_at_ms) == ("expired", 100, T0)


def test_a_settle_leaves_the_due_entry_early_and_the_sweeps_look_corrects_it(
    store: Any,
) -> None:
    # A settle does not touch the registry (one write less per request): the entry keeps
    # "a"'s deadline, early but never late, so nothing due is ever missed.
    reserve(store, 100, T0, rid="a", epoch="e1")
    reserve(store, 100, T0 + 5_000, rid="b")
    settle_at(store, "a", T0 + 6_000)
    assert store.due_scopes(now_ms=T0 + TTL - 1) == []
    assert store.due_scopes(now_ms=T0 + TTL + 1) == ["u"]  # early: "a" is settled
    assert store.expire("u", now_ms=T0 + TTL + 1) == 0  # the sweep finds nothing due ...
    assert store.due_scopes(now_ms=T0 + TTL + 1) == []  # ... and sets "b"'s deadline
    assert store.due_scopes(now_ms=T0 + TTL + 5_000) == ["u"]
    settle_at(store, "b", T0 + 7_000)
    assert store.expire("u", now_ms=T0 + TTL + 5_000) == 0
    assert store.due_scopes(now_ms=T0 + 100 * TTL) == []  # nothing pending: the entry left


def test_an_outbox_the_registry_never_saw_is_registered_by_its_ack(store: Any) -> None:
    # Records written before the registries existed (an upgrade), in the old expired format.
    outbox = store.keys("u")[4]
    store.client.hset(outbox, mapping={"old": f"3:100:{T0}:gpt-4", "older": f"3:70:{T0 - 9}:m"})
    assert store.backlog(now_ms=T0) == (0, None)
    [entry, _] = sorted(store.outbox("u"), key=lambda e: e.reservation_id)
    assert (entry.status, entry.actual) == ("expired", 100)
    assert store.ack_outbox("u", ["old"], now_ms=T0 + 1_000) == 1
    assert store.backlog(now_ms=T0 + 1_000) == (1, 1.009)  # since it was reserved: never late
