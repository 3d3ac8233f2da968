"""Contract tests of the Redis window store, on the real Redis, with an injected clock."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django_redis import get_redis_connection
from redis import Redis

from quotas.backends.redis import LedgerEntry, RedisWindowStore
from quotas.core.types import Limits, ReserveStatus, WindowSpec
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


def limits(tokens: int = 1000, **kwargs: Any) -> Limits:
    return Limits(tokens_per_window=tokens, plan_slug="p", **kwargs)


def reserve(store: Any, tokens: int, at: int, rid: str | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("limits", limits())
    return store.reserve("u", rid or uuid.uuid4().hex, tokens, ttl_ms=TTL, now_ms=at, **kwargs)


def test_without_stored_limits_asks_for_them_and_charges_nothing(store: Any) -> None:
    result = store.reserve("u", "a", 10, ttl_ms=TTL, now_ms=T0)
    assert result.status is ReserveStatus.NEEDS_CONFIG
    assert result.window_has_epoch is False
    assert store.peek("u", now_ms=T0) is False


def test_tokens_come_back_exactly_when_their_bucket_leaves_the_window(store: Any) -> None:
    assert reserve(store, 600, T0 + 100).allowed  # bucket [T0, T0+500)
    assert reserve(store, 400, T0 + 2_600).allowed  # bucket [T0+2500, T0+3000)
    # A bucket leaves when its end is a window (6 s) old: T0 + 6500. Never earlier, so no
    # token counts for less than a full window; not at a window boundary.
    assert not reserve(store, 600, T0 + 6_499).allowed
    assert reserve(store, 600, T0 + 6_500).allowed
    # The second bucket leaves at T0 + 3000 + 6000.
    assert not reserve(store, 400, T0 + 8_999).allowed
    assert reserve(store, 400, T0 + 9_000).allowed


def test_no_true_window_ever_holds_more_than_the_budget(store: Any) -> None:
    """Whatever the timing, tokens admitted within any 6 s stay within the budget."""
    admitted: list[tuple[int, int]] = []
    for i in range(400):
        at = T0 + i * 37  # every 37 ms, across bucket edges, for 14.8 s
        if reserve(store, 90, at).allowed:
            admitted.append((at, 90))
    for start, _ in admitted:
        inside = sum(tokens for at, tokens in admitted if start <= at < start + 6_000)
        assert inside <= 1000


def test_a_rejected_reservation_consumes_nothing(store: Any) -> None:
    assert reserve(store, 900, T0).allowed
    for _ in range(5):
        assert reserve(store, 200, T0 + 10).status is ReserveStatus.OVER_TOKENS
    snapshot = store.peek("u", now_ms=T0 + 20)
    assert (snapshot.used, snapshot.remaining, snapshot.reserved) == (900, 100, 900)
    assert reserve(store, 100, T0 + 30).allowed


def test_retry_after_is_exact(store: Any) -> None:
    reserve(store, 300, T0 + 100)
    reserve(store, 300, T0 + 1_100)
    reserve(store, 300, T0 + 2_100)
    refused = reserve(store, 350, T0 + 3_000)
    assert refused.status is ReserveStatus.OVER_TOKENS
    # 350 needs 250 more tokens freed: the first bucket (300) leaves at T0 + 6500.
    assert refused.retry_after == pytest.approx(3.5)
    at = T0 + 3_000 + int(refused.retry_after * 1000)
    assert not reserve(store, 350, at - 500).allowed  # one bucket earlier
    assert reserve(store, 350, at).allowed


def test_retry_after_skips_buckets_that_do_not_free_enough(store: Any) -> None:
    reserve(store, 100, T0)
    reserve(store, 800, T0 + 1_000)
    refused = reserve(store, 500, T0 + 2_000)
    # Freeing the 100-token bucket is not enough; the 800-token one leaves at T0 + 7500.
    assert refused.retry_after == pytest.approx(5.5)


def test_over_the_request_cap_or_the_whole_budget_never_fits(store: Any) -> None:
    capped = limits(1000, max_tokens_per_request=300)
    assert reserve(store, 301, T0, limits=capped).status is ReserveStatus.OVER_REQUEST_CAP
    assert reserve(store, 1001, T0).status is ReserveStatus.OVER_BUDGET
    assert store.peek("u", now_ms=T0).used == 0


def test_settle_refund_returns_tokens_at_once(store: Any) -> None:
    r = reserve(store, 800, T0, rid="a")
    assert not reserve(store, 500, T0 + 10).allowed
    settled = store.settle("u", "a", 200, epoch=r.epoch, now_ms=T0 + 20)
    assert (settled.status, settled.applied, settled.remaining) == (1, -600, 800)
    assert reserve(store, 500, T0 + 30).allowed


def test_settle_extra_charge_past_the_limit_blocks_the_next_request(store: Any) -> None:
    r = reserve(store, 100, T0, rid="a")
    settled = store.settle("u", "a", 1_200, epoch=r.epoch, now_ms=T0 + 10)
    assert settled.remaining == -200
    refused = reserve(store, 1, T0 + 20)
    assert refused.status is ReserveStatus.OVER_TOKENS
    # The debt sits in the original bucket and ages out with it.
    assert refused.retry_after == pytest.approx(6.48)


def test_a_reused_reservation_id_is_refused_and_charges_nothing(store: Any) -> None:
    every = limits(1000, requests_per_minute=10, max_concurrent_requests=5)
    first = reserve(store, 300, T0, rid="a", limits=every)
    again = reserve(store, 500, T0 + 10, rid="a", limits=every)
    assert again.status is ReserveStatus.DUPLICATE_ID
    snapshot = store.peek("u", now_ms=T0 + 20)
    assert (snapshot.used, snapshot.reserved, snapshot.requests_used, snapshot.in_flight) == (
        300,
        300,
        1,
        1,
    )
    # The first reservation stands as it was: settling it refunds from its own estimate.
    settled = store.settle("u", "a", 100, epoch=first.epoch, now_ms=T0 + 30)
    assert (settled.estimate, settled.applied) == (300, -200)
    assert store.peek("u", now_ms=T0 + 40).used == 100


def test_an_extra_charge_settled_later_goes_to_the_original_bucket_and_ages_out_with_it(
    store: Any,
) -> None:
    a = reserve(store, 100, T0 + 100, rid="a")  # bucket [T0, T0 + 500)
    reserve(store, 300, T0 + 3_000)  # bucket [T0 + 3000, T0 + 3500)
    settled = store.settle("u", "a", 700, epoch=a.epoch, now_ms=T0 + 3_100)
    assert settled.applied == 600
    assert store.peek("u", now_ms=T0 + 3_200).used == 1000
    # The 700 leave when the first bucket does (T0 + 6500), not with the settle's bucket.
    assert reserve(store, 1, T0 + 3_200).retry_after == pytest.approx(3.3)
    assert store.peek("u", now_ms=T0 + 6_499).used == 1000
    assert store.peek("u", now_ms=T0 + 6_500).used == 300


def test_a_refund_settled_later_goes_to_the_original_bucket_and_ages_out_with_it(
    store: Any,
) -> None:
    a = reserve(store, 800, T0 + 100, rid="a")
    reserve(store, 100, T0 + 3_000)
    settled = store.settle("u", "a", 200, epoch=a.epoch, now_ms=T0 + 3_100)
    assert settled.applied == -600
    assert store.peek("u", now_ms=T0 + 3_200).used == 300
    assert store.peek("u", now_ms=T0 + 6_500).used == 100  # only the later 100 are left


def test_a_settle_reaches_the_oldest_bucket_still_in_the_window(store: Any) -> None:
    a = reserve(store, 800, T0, rid="a")
    late = store.settle("u", "a", 100, epoch=a.epoch, now_ms=T0 + 6_499)  # its last live ms
    assert late.applied == -700
    assert store.peek("u", now_ms=T0 + 6_499).used == 100


@pytest.fixture
def hour_store() -> Iterator[RedisWindowStore]:
    yield from store_on(get_redis_connection("default"), window=3600, bucket=60)


def test_the_keys_outlive_every_token_and_reservation_they_hold(hour_store: Any) -> None:
    """Real time (PEXPIRE counts in it): an hour of one-minute buckets, so a key expiring
    before its newest bucket leaves (up to a minute early) cannot go unseen."""
    store = hour_store
    result = store.reserve("u", "a", 100, ttl_ms=TTL, limits=limits())
    window, pending, held = (store.keys("u")[i] for i in (0, 2, 3))
    before = redis_ms(store.client)  # no later than each PTTL read: a lower bound
    leaves_ms = result.now_ms + int(result.reset_seconds * 1000)
    assert before + store.client.pttl(window) >= leaves_ms
    for key in (pending, held):
        assert before + store.client.pttl(key) >= result.now_ms + TTL


def test_settling_twice_changes_nothing(store: Any) -> None:
    r = reserve(store, 500, T0, rid="a")
    first = store.settle("u", "a", 100, epoch=r.epoch, now_ms=T0 + 10)
    second = store.settle("u", "a", 100, epoch=r.epoch, now_ms=T0 + 20)
    by_id = store.settle("u", "a", 999, epoch="", now_ms=T0 + 30)
    assert first.status == 1 and second.status == 0 and by_id.status == 0
    assert store.peek("u", now_ms=T0 + 40).used == 100


def test_a_refund_after_the_bucket_aged_out_changes_nothing(store: Any) -> None:
    r = reserve(store, 500, T0, rid="a")
    reserve(store, 300, T0 + 3_000)
    late = store.settle("u", "a", 0, epoch=r.epoch, now_ms=T0 + 6_500)
    assert late.status == 1 and late.applied == 0
    assert store.peek("u", now_ms=T0 + 6_500).used == 300


def test_settle_releases_the_concurrency_slot(store: Any) -> None:
    two = limits(1000, max_concurrent_requests=2)
    a = reserve(store, 10, T0, rid="a", limits=two)
    reserve(store, 10, T0, rid="b", limits=two)
    refused = reserve(store, 10, T0, rid="c", limits=two)
    assert refused.status is ReserveStatus.OVER_CONCURRENCY
    store.settle("u", "a", 10, epoch=a.epoch, now_ms=T0 + 1)
    assert reserve(store, 10, T0 + 2, rid="c", limits=two).allowed


def test_requests_per_minute_slide_and_report_retry_after(store: Any) -> None:
    rpm = limits(10_000, requests_per_minute=3)
    for i in range(3):
        assert reserve(store, 1, T0 + i * 1_000, limits=rpm).allowed
    refused = reserve(store, 1, T0 + 10_000, limits=rpm)
    assert refused.status is ReserveStatus.OVER_REQUESTS
    assert refused.retry_after == pytest.approx(51.0)  # the first request leaves at T0 + 61 s
    assert not reserve(store, 1, T0 + 60_999, limits=rpm).allowed
    assert reserve(store, 1, T0 + 61_000, limits=rpm).allowed


def test_all_or_nothing_across_limits(store: Any) -> None:
    rpm = limits(1000, requests_per_minute=1)
    assert reserve(store, 10, T0, limits=rpm).allowed
    assert not reserve(store, 10, T0 + 1, limits=rpm).allowed  # tokens fit, requests do not
    assert store.peek("u", now_ms=T0 + 2).used == 10


def test_expired_reservations_move_to_the_outbox_once(store: Any) -> None:
    store.reserve("u", "a", 100, ttl_ms=1_000, limits=limits(), now_ms=T0, model="gpt-4")
    assert store.expire("u", now_ms=T0 + 999) == 0
    assert store.expire("u", now_ms=T0 + 1_001) == 1
    expired = store.outbox("u")
    assert expired == [LedgerEntry("u", "a", "expired", 100, 100, T0, model="gpt-4")]
    assert store.expire("u", now_ms=T0 + 1_002) == 0
    assert store.outbox("u") == expired  # still waiting for its ack
    store.ack_outbox("u", ["a"])
    assert store.outbox("u") == []
    snapshot = store.peek("u", now_ms=T0 + 1_004)
    assert (snapshot.used, snapshot.reserved, snapshot.in_flight) == (100, 0, 0)


def test_a_settle_puts_its_ledger_record_in_the_outbox_once(store: Any) -> None:
    store.reserve("u", "a", 100, ttl_ms=60_000, limits=limits(), now_ms=T0, model="ft:gpt:x")
    args = {"epoch": "", "status": "refunded", "prompt_tokens": 30, "now_ms": T0 + 5}
    assert store.settle("u", "a", 30, **args).status == 1
    assert store.settle("u", "a", 30, **args).status == 0  # a repeat records nothing more
    assert store.outbox("u") == [
        LedgerEntry("u", "a", "refunded", 100, 30, T0, T0 + 5, 30, None, "ft:gpt:x")
    ]


def test_a_settle_redis_no_longer_knows_records_the_callers_figures(store: Any) -> None:
    reserve(store, 10, T0, epoch="e1")
    args = {"epoch": "old", "estimate": 80, "reserved_at_ms": T0 - 5, "model": "m"}
    assert store.settle("u", "lost", 70, now_ms=T0 + 1, **args).status == 2
    assert store.settle("u", "lost", 70, now_ms=T0 + 2, **args).status == 0
    assert store.outbox("u") == [
        LedgerEntry("u", "lost", "settled", 80, 70, T0 - 5, T0 + 1, None, None, "m")
    ]


def test_a_lost_window_is_seeded_from_the_caller(store: Any) -> None:
    spec = store.spec
    seed = [(spec.bucket_of(T0 - 7_000), 999), (spec.bucket_of(T0 - 1_000), 700)]
    result = reserve(store, 200, T0, epoch="e2", seed=seed)
    assert result.allowed and result.epoch == "e2"
    assert store.peek("u", now_ms=T0).used == 900  # the 7 s old bucket is outside the window


def test_every_key_has_a_ttl_and_the_users_hash_tag(store: Any) -> None:
    store.reserve("u", "a", 100, ttl_ms=TTL, limits=limits(requests_per_minute=5), now_ms=None)
    for key in store.keys("u"):
        if store.client.exists(key):
            assert "{u}" in key
            assert store.client.pttl(key) > 0


def test_memory_after_1000_reservations_over_one_window(store: Any) -> None:
    rpm = limits(10**9, requests_per_minute=10_000)
    for i in range(1_000):
        at = T0 + i * 6  # 1,000 reservations spread over the 6 s window
        r = reserve(store, 500, at, rid=f"r{i}", limits=rpm)
        store.settle("u", f"r{i}", 450, epoch=r.epoch, now_ms=at + 3)
        if i % 100 == 99:  # the ledger flush drains the outbox every few seconds
            store.ack_outbox("u", [e.reservation_id for e in store.outbox("u", batch=1000)])
    assert store.outbox("u") == []
    assert store.memory_usage("u") <= 2048


def test_a_reservation_redis_lost_is_charged_once_however_often_it_is_settled(store: Any) -> None:
    lost = reserve(store, 300, T0, rid="a", epoch="e1")
    store.client.delete(*store.keys("u"))  # Redis loses the window and the reservation
    reserve(store, 100, T0 + 10, epoch="e2")  # rebuilt (empty ledger), new epoch
    first = store.settle("u", "a", 250, epoch=lost.epoch, now_ms=T0 + 20)
    again = store.settle("u", "a", 250, epoch=lost.epoch, now_ms=T0 + 30)
    assert (first.status, first.applied, again.status) == (2, 250, 0)
    assert store.peek("u", now_ms=T0 + 40).used == 350


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
    assert store.peek("u", now_ms=T0).remaining == 997

    # A thread's connection goes when the thread does (no socket per finished thread).
    gone = weakref.ref(others.pop())
    gc.collect()
    assert gone() is None


def test_a_script_flushed_from_redis_is_sent_again(private_store: Any) -> None:
    store = private_store
    reserve(store, 10, T0)
    store.client.script_flush()  # this run's own server: the shared one is never flushed
    assert reserve(store, 10, T0).allowed
    assert store.peek("u", now_ms=T0).remaining == 980


def test_a_connection_the_server_closed_is_replaced_without_failing_the_call(store: Any) -> None:
    reserve(store, 10, T0)
    mine = store.scripts._local.connection
    mine.send_command("CLIENT", "ID")
    client_id = mine.read_response()
    store.client.client_kill_filter(_id=client_id)  # as a restart or an idle timeout would
    assert reserve(store, 10, T0).allowed  # charged once: the first attempt never ran
    assert store.peek("u", now_ms=T0).remaining == 980


def test_a_script_error_leaves_the_connection_usable(store: Any) -> None:
    reserve(store, 10, T0)
    mine = store.scripts._local.connection
    with pytest.raises(StoreUnavailable, match="Redis error"):  # no window length: Lua fails
        store.scripts.run("reserve", store.keys("u"), [str(T0), "not a number"])
    assert store.scripts._local.connection is mine and open_socket(mine)
    assert reserve(store, 10, T0).allowed


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
            ok = reserve(store, 10, T0).allowed
            shared = store.scripts._local.connection._sock is parent_socket
            os.write(write, b"1" if ok and not shared else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert reserve(store, 10, T0).allowed  # the parent's connection is still in step
    assert store.peek("u", now_ms=T0).remaining == 970


def test_settle_many_is_each_settle_in_one_round_trip_even_after_a_script_flush(
    private_store: Any,
) -> None:
    store = private_store
    a, b = reserve(store, 300, T0, rid="a"), reserve(store, 300, T0, rid="b")
    store.client.set(store.keys("z")[0], "not a hash")  # scope z's script will fail
    store.client.script_flush()  # every call in the pipeline meets NOSCRIPT: sent again
    results = store.settle_many(
        [
            {"scope": "u", "reservation_id": "a", "actual_tokens": 100, "epoch": a.epoch},
            {"scope": "u", "reservation_id": "b", "actual_tokens": 0, "epoch": b.epoch},
            {"scope": "u", "reservation_id": "a", "actual_tokens": 999, "epoch": a.epoch},
            {"scope": "z", "reservation_id": "c", "actual_tokens": 5, "epoch": "e"},
        ]
    )
    assert [r.status for r in results[:3]] == [1, 1, 0]  # the repeat changes nothing
    assert isinstance(results[3], StoreUnavailable)  # its script failed; the others stand
    assert store.peek("u", now_ms=T0).used == 100


# -- the ledger registries: where the sweep's work is, and how old the backlog is -----------
def settle_at(store: Any, rid: str, at: int) -> Any:
    return store.settle("u", rid, 50, epoch=reserve_epoch(store), now_ms=at)


def reserve_epoch(store: Any) -> str:
    return store.window_contents("u", now_ms=T0).epoch


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


def test_a_settle_moves_the_due_deadline_to_the_next_reservation(store: Any) -> None:
    reserve(store, 100, T0, rid="a", epoch="e1")
    reserve(store, 100, T0 + 5_000, rid="b")
    settle_at(store, "a", T0 + 6_000)
    assert store.due_scopes(now_ms=T0 + TTL + 1) == []  # "a" is settled: not due at its TTL
    assert store.due_scopes(now_ms=T0 + TTL + 5_000) == ["u"]  # "b" is
    settle_at(store, "b", T0 + 7_000)
    assert store.due_scopes(now_ms=T0 + 100 * TTL) == []


def test_an_outbox_the_registry_never_saw_is_registered_by_its_ack(store: Any) -> None:
    # Records written before the registries existed (an upgrade), in the old expired format.
    outbox = store.keys("u")[4]
    store.client.hset(outbox, mapping={"old": f"3:100:{T0}:gpt-4", "older": f"3:70:{T0 - 9}:m"})
    assert store.backlog(now_ms=T0) == (0, None)
    [entry, _] = sorted(store.outbox("u"), key=lambda e: e.reservation_id)
    assert (entry.status, entry.actual) == ("expired", 100)
    assert store.ack_outbox("u", ["old"], now_ms=T0 + 1_000) == 1
    assert store.backlog(now_ms=T0 + 1_000) == (1, 1.009)  # since it was reserved: never late
