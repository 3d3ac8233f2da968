"""Async views, async streams and the async Python API, on the real Redis.

The views run under Django's ASGI request path (``AsyncClient``: the middleware in async
mode); the streams are metered by ``AsyncStreamMeter``; ``areserve`` / ``asettle`` /
``arefund`` / ``abudget_for`` use ``redis.asyncio`` with the sync path's scripts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from quotas import services
from quotas.core.tokens import encoding_for_model
from quotas.engine import ledger as ledger_engine
from quotas.exceptions import QuotaExceeded, StoreUnavailable
from quotas.models import UsageRecord
from quotas.signals import usage_settled
from quotas.streaming import AsyncStreamMeter
from tests.async_urls import USAGE, WORD, endless_words, events_with_usage, failing_words

from .test_enforcement_http import BODY, ESTIMATE

# Async views reach the database from worker threads: no test transaction to hide rows in.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.async_urls")]

PROMPT = ESTIMATE - BODY["max_tokens"]


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))


def used(user: Any) -> int:
    return services.budget_for(user)["used"]


def words(count: int) -> int:
    return len(encoding_for_model("gpt-4").encode(WORD * count))


async def _post(user: Any, url: str, chunks: int | None = None) -> tuple[Any, list[bytes]]:
    """POST ``BODY``; read the whole stream, or ``chunks`` chunks and then hang up."""
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.post(url, BODY, content_type="application/json")
    if not response.streaming:
        return response, [response.content]
    received: list[bytes] = []
    stream = response.streaming_content
    async for chunk in stream:
        received.append(chunk)
        if chunks is not None and len(received) == chunks:
            break
    await stream.aclose()
    await asyncio.sleep(0.05)  # the event loop closes what the response dropped
    return response, received


post = async_to_sync(_post)


def test_async_view_streaming_an_async_generator_is_served_and_settled_once(user):
    response, chunks = post(user, "/async-stream/")
    assert response.status_code == 200
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert response["X-RateLimit-Limit"] == "1000"
    assert used(user) == USAGE["total_tokens"]
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (11, 29, "settled")


def test_client_hanging_up_on_an_async_stream_is_settled_with_what_was_produced(user):
    response, chunks = post(user, "/async-endless/", chunks=5)
    assert response.status_code == 200 and len(chunks) == 5
    row = UsageRecord.objects.get()
    # The prompt plus the words sent (at most one more was read before the hang-up).
    assert row.completion_tokens in (words(5), words(6))
    assert used(user) == PROMPT + row.completion_tokens


def test_async_stream_that_fails_is_settled_with_what_it_produced(user):
    with pytest.raises(RuntimeError):
        post(user, "/async-failing/")
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens) == (PROMPT, words(2))
    assert used(user) == PROMPT + words(2)


def test_async_view_json_answer_settles_with_its_usage(user):
    response, _ = post(user, "/async-json/")
    assert response.status_code == 200
    assert used(user) == USAGE["total_tokens"]
    assert int(response["X-RateLimit-Remaining"]) == 1000 - USAGE["total_tokens"]


def test_sync_stream_under_asgi_is_metered_chunk_by_chunk(user):
    response, chunks = post(user, "/sync-stream/")
    assert response.status_code == 200 and len(chunks) == 3
    assert response.is_async  # served by the async meter, not buffered by Django
    assert used(user) == USAGE["total_tokens"]


def test_async_view_over_budget_is_refused_before_the_view_runs(make_plan, make_user):
    poor = make_user(plan=make_plan(slug="poor", tokens_per_hour=50))
    response, _ = post(poor, "/async-stream/")
    assert response.status_code == 413  # the estimate (100) can never fit a 50-token budget
    assert UsageRecord.objects.count() == 0


# -- the async Python API --------------------------------------------------------------------


def test_areserve_asettle_abudget_for_match_the_sync_twins(user):
    async def scenario() -> tuple[Any, ...]:
        reservation = await services.areserve(user, 300, model="gpt-4")
        before = await services.abudget_for(user)
        settled = await services.asettle(reservation, prompt_tokens=20, completion_tokens=30)
        again = await services.asettle(reservation, total_tokens=999)  # idempotent
        after = await services.abudget_for(user)
        return reservation, before, settled, again, after

    reservation, before, settled, again, after = async_to_sync(scenario)()
    assert reservation.state.remaining == 700
    assert (before["used"], before["reserved"]) == (300, 300)
    assert settled.actual_tokens == 50 and settled.settled_now
    assert not again.settled_now
    assert (after["used"], after["reserved"]) == (50, 0)
    synced = services.budget_for(user)
    for name in ("plan", "limit", "used", "reserved", "remaining", "debt", "in_flight"):
        assert after[name] == synced[name], name
    row = UsageRecord.objects.get()
    assert (row.actual_tokens, row.estimated_tokens) == (50, 300)


def test_arefund_gives_everything_back_and_asettle_by_id_works(user):
    async def scenario() -> None:
        first = await services.areserve(user, 400)
        await services.arefund(first)
        second = await services.areserve(user, 400)
        await services.asettle(second.id, total_tokens=10)

    async_to_sync(scenario)()
    assert used(user) == 10
    statuses = sorted(UsageRecord.objects.values_list("status", flat=True))
    assert statuses == ["refunded", "settled"]


@pytest.mark.parametrize("receiver", [False, True])
def test_asettle_hands_the_ledger_record_to_the_batch_on_the_loop_unless_a_receiver_may_block(
    user, quota_config, receiver
):
    quota_config(LEDGER_BATCH_SECONDS=3600)  # the batch waits: the test sends it
    batcher = ledger_engine.ledger_batcher()
    batcher._pending.clear()
    added_on: list[str] = []
    urgent: list[bool] = []
    add_nowait, add = batcher.add_nowait, batcher.add

    def spy(real: Any) -> Any:
        def call(payload: Any, **options: Any) -> None:
            added_on.append(threading.current_thread().name)
            urgent.append(options.get("urgent", False))
            real(payload, **options)

        return call

    def users_in_receiver(**kwargs: Any) -> None:  # the ORM: refused on an event loop
        seen.append(UsageRecord.objects.count())

    seen: list[int] = []
    if receiver:
        usage_settled.connect(users_in_receiver)
    batcher.add_nowait, batcher.add = spy(add_nowait), spy(add)  # type: ignore[method-assign]

    async def scenario() -> str:
        await services.asettle(await services.areserve(user, 300), total_tokens=40)
        return threading.current_thread().name

    try:
        loop_thread = async_to_sync(scenario)()
    finally:
        del batcher.add_nowait, batcher.add
        usage_settled.disconnect(users_in_receiver)
    assert len(added_on) == 1
    assert (added_on[0] == loop_thread) is not receiver
    assert urgent == [False]  # Redis took the settle: the outbox has the record, it may wait
    assert seen == ([0] if receiver else [])
    assert services.flush_ledger_batch() == 1
    assert UsageRecord.objects.get().actual_tokens == 40


def test_areserve_refuses_as_reserve_does(user):
    async def scenario() -> None:
        await services.areserve(user, 600)
        await services.areserve(user, 600)

    with pytest.raises(QuotaExceeded) as refused:
        async_to_sync(scenario)()
    assert refused.value.remaining == 400 and refused.value.retry_after > 0
    assert used(user) == 600


def test_areserve_follows_the_failure_policy_when_redis_is_down(user, quota_config, dead_cache):
    async def reserve() -> Any:
        return await services.areserve(user, 100)

    quota_config(CACHE_ALIAS=dead_cache)
    reservation = async_to_sync(reserve)()  # fail-open by default: served, degraded
    assert reservation.degraded
    quota_config(CACHE_ALIAS=dead_cache, FAILURE_POLICY="closed")
    with pytest.raises(StoreUnavailable):
        async_to_sync(reserve)()


# -- AsyncStreamMeter on its own --------------------------------------------------------------


def _metered(user: Any, content: Any, steps: int | None, cancel: bool = False) -> Any:
    async def run() -> Any:
        reservation = await services.areserve(user, 100, model="gpt-4", prompt_tokens=7)
        meter = AsyncStreamMeter(content, reservation, 7)
        if cancel:
            task = asyncio.ensure_future(_read(meter, None))
            await asyncio.sleep(0.055)  # a few words, then the client disconnects
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            await _read(meter, steps)
            await meter.aclose()
            await meter.aclose()  # closing twice settles once
        return reservation

    return async_to_sync(run)()


async def _read(meter: Any, steps: int | None) -> None:
    count = 0
    async for _ in meter:
        count += 1
        if steps is not None and count == steps:
            return


def test_meter_settles_once_at_the_end_with_the_usage_chunk(user):
    reservation = _metered(user, events_with_usage(), None)
    assert len(reservation.settlements) == 1
    assert reservation.settlements[0].actual_tokens == USAGE["total_tokens"]
    assert UsageRecord.objects.count() == 1


def test_meter_settles_once_on_aclose_with_the_text_so_far(user):
    reservation = _metered(user, endless_words(), 3)
    assert [s.actual_tokens for s in reservation.settlements] == [7 + words(3)]
    assert UsageRecord.objects.count() == 1


def test_meter_settles_once_when_its_task_is_cancelled(user):
    reservation = _metered(user, endless_words(), None, cancel=True)
    assert len(reservation.settlements) == 1
    produced = reservation.settlements[0].actual_tokens - 7
    assert words(2) <= produced <= words(10)
    assert UsageRecord.objects.get().completion_tokens == produced


def test_meter_settles_once_when_the_stream_fails(user):
    with pytest.raises(RuntimeError):
        _metered(user, failing_words(), None)
    assert UsageRecord.objects.get().completion_tokens == words(2)


def test_async_view_stream_under_wsgi_is_served_and_settled(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    response = client.post("/async-stream/", BODY, content_type="application/json")
    assert response.status_code == 200
    # As a WSGI server reads it (Django reads an async stream whole there, with a warning).
    with pytest.warns(Warning, match="must consume asynchronous iterators"):
        body = b"".join(response)
    assert body.endswith(b"data: [DONE]\n\n")
    response.close()
    assert used(user) == USAGE["total_tokens"]
    assert UsageRecord.objects.get().completion_tokens == USAGE["completion_tokens"]


def test_the_async_client_packs_commands_in_c_as_the_sync_client_does(redis_client):
    """``redis.asyncio`` packs commands in Python (most of an ``asettle``'s CPU went there);
    the store's async connections pack them with hiredis, as redis-py's sync ones do: the
    same bytes, the same refusal of a value Redis cannot take."""
    import redis.asyncio as aioredis
    from redis.exceptions import DataError
    from redis.utils import HIREDIS_AVAILABLE

    from quotas.backends.aio import async_client_for

    kind = async_client_for(redis_client).connection_pool.connection_class
    assert issubclass(kind, aioredis.Connection)
    assert (kind is not aioredis.Connection) is HIREDIS_AVAILABLE  # without hiredis: as is
    args = ("EVALSHA", "0" * 40, 2, "q:{u1}:w", "k2", 1, -5, 2.5, 0.1, 1e-05, "é", b"\x00y", 10**20)
    ours, python = kind(host="127.0.0.1"), aioredis.Connection(host="127.0.0.1")
    assert b"".join(ours.pack_command(*args)) == b"".join(python.pack_command(*args))
    for connection in (ours, python):
        with pytest.raises(DataError):
            connection.pack_command("SET", "k", None)
