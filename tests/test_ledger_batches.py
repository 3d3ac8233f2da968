"""The ledger's way from a settle to its rows: the Redis outbox (written atomically with the
settle) and the per-process batch of Celery tasks, on real Redis and the configured database.
The rest of the suite sends one task per settle (``LEDGER_BATCH_SECONDS=0``); here batching
is on, as it is by default."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.db import transaction
from django.db.models import Sum

from quotas import ledger, services
from quotas.backends.redis import LedgerEntry
from quotas.engine import ledger as ledger_engine
from quotas.engine.batching import Batcher
from quotas.engine.rows import COPY_MIN_ROWS, row_of
from quotas.models import UsageRecord
from quotas.tasks import record_usage_task
from tests.conftest import keys_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(make_plan: Any, make_user: Any, quota_config: Any) -> Any:
    # A batch interval no test outlives: the tests send batches themselves.
    quota_config(LEDGER_BATCH_SECONDS=3600, LEDGER_BATCH_SIZE=50)
    ledger_engine.ledger_batcher()._pending.clear()  # nothing left over from another test
    yield make_user(plan=make_plan(tokens_per_hour=100_000))
    ledger_engine.ledger_batcher()._pending.clear()  # nor for the exit hook, after the database


@pytest.fixture
def published() -> Any:
    """The batches handed to the broker (the eager worker still runs them)."""
    with mock.patch.object(
        record_usage_task, "apply_async", wraps=record_usage_task.apply_async
    ) as spy:
        yield spy


def rows(user: Any) -> dict[str, Any]:
    records = UsageRecord.objects.filter(user=user)
    return {"count": records.count(), **records.aggregate(tokens=Sum("actual_tokens"))}


def serve(user: Any, n: int, **usage: Any) -> list[Any]:
    return [services.settle(services.reserve(user, 100), **usage) for _ in range(n)]


def test_settles_wait_in_the_outbox_and_the_batch_until_it_is_sent(user, published):
    serve(user, 5, prompt_tokens=20, completion_tokens=40)
    assert rows(user)["count"] == 0
    assert len(services.get_store().outbox(str(user.pk))) == 5
    assert published.call_count == 0

    assert services.flush_ledger_batch() == 5
    assert published.call_count == 1  # one task for the whole batch
    # The worker's log names the records; Celery's own repr of them is not built.
    shown = published.call_args.kwargs["argsrepr"]
    assert shown.startswith(f"[5 usage records: {user.pk}/") and shown.endswith(", ... 2 more]")
    assert rows(user) == {"count": 5, "tokens": 300}
    assert services.get_store().outbox(str(user.pk)) == []  # the task dropped the copies
    assert ledger.flush_ledger() == 0


def test_a_full_batch_is_sent_by_the_settle_that_fills_it(user, published, quota_config):
    quota_config(LEDGER_BATCH_SECONDS=3600, LEDGER_BATCH_SIZE=3)
    serve(user, 4)
    assert published.call_count == 1
    assert rows(user)["count"] == 3
    assert services.flush_ledger_batch() == 1
    assert rows(user)["count"] == 4


def test_a_batch_that_is_never_sent_loses_nothing(user):
    # The process dies before its batch goes out: the sweep writes the rows from the outbox,
    # with every figure the settle knew.
    [served] = serve(user, 1, prompt_tokens=25, completion_tokens=50)
    [refunded] = [services.refund(services.reserve(user, 300, model="gpt-4o"))]
    ledger_engine.ledger_batcher()._pending.clear()  # what dying does to the batch

    assert ledger.flush_ledger() == 2
    got = {
        r.request_id: (r.status, r.estimated_tokens, r.prompt_tokens, r.completion_tokens,
                       r.actual_tokens, r.model, r.user_id)
        for r in UsageRecord.objects.all()
    }  # fmt: skip
    assert got == {
        served.reservation_id: ("settled", 100, 25, 50, 75, "", user.pk),
        refunded.reservation_id: ("refunded", 300, None, None, 0, "gpt-4o", user.pk),
    }
    assert services.flush_ledger_batch() == 0
    assert ledger.flush_ledger() == 0


def test_a_batch_sent_after_the_sweep_wrote_its_rows_changes_nothing(user):
    serve(user, 3, total_tokens=70)
    assert ledger.flush_ledger() == 3
    assert services.flush_ledger_batch() == 3  # the task finds every row written
    assert rows(user) == {"count": 3, "tokens": 210}


def test_a_batch_survives_redis_losing_the_outbox(user, redis_client, isolated_quotas):
    serve(user, 4, total_tokens=90)
    keys = keys_of(redis_client, isolated_quotas)
    redis_client.delete(*keys)  # a Redis restart without persistence, before any sweep
    services.flush_ledger_batch()
    assert rows(user) == {"count": 4, "tokens": 360}


def test_rows_a_concurrent_writer_wrote_first_are_neither_doubled_nor_counted(user):
    serve(user, 3, total_tokens=50)
    payloads = list(ledger_engine.ledger_batcher()._pending)
    real_atomic, raced = transaction.atomic, []

    @contextmanager
    def racing_atomic(*args: Any, **kwargs: Any) -> Iterator[None]:
        if not raced:  # another writer commits one of the rows after the existence check
            raced.append(True)
            entry = LedgerEntry.from_payload(payloads[0])
            row_of(entry, user.pk, entry.reserved_at_ms).save()
        with real_atomic(*args, **kwargs):
            yield

    with mock.patch.object(transaction, "atomic", racing_atomic):
        assert ledger.write_usage(payloads) == 2
    assert raced and rows(user) == {"count": 3, "tokens": 150}


def test_a_batch_large_enough_for_copy_survives_a_concurrent_writer_too(user):
    # From COPY_MIN_ROWS records PostgreSQL gets a COPY: its duplicate-key error must be
    # Django's IntegrityError (row by row then), not an outage that retries the batch forever.
    serve(user, 30, total_tokens=50)
    payloads = list(ledger_engine.ledger_batcher()._pending)
    assert len(payloads) >= COPY_MIN_ROWS
    entry = LedgerEntry.from_payload(payloads[0])
    real_atomic, raced = transaction.atomic, []

    @contextmanager
    def racing_atomic(*args: Any, **kwargs: Any) -> Iterator[None]:
        if not raced:  # another writer commits one of the rows after the existence check
            raced.append(True)
            row_of(entry, user.pk, entry.reserved_at_ms).save()
        with real_atomic(*args, **kwargs):
            yield

    with mock.patch.object(transaction, "atomic", racing_atomic):
        assert ledger.write_usage(payloads) == 29
    assert raced and rows(user) == {"count": 30, "tokens": 1500}
    assert ledger.write_usage(payloads) == 0  # a re-delivered batch writes nothing


def test_with_the_broker_down_a_batch_is_written_directly(user):
    refused = OSError("no broker")
    with mock.patch.object(record_usage_task, "apply_async", side_effect=refused) as publish:
        serve(user, 3, total_tokens=10)
        assert services.flush_ledger_batch() == 3
    assert publish.call_count == 1  # one failed publish for the batch, then written directly
    assert rows(user) == {"count": 3, "tokens": 30}
    assert services.get_store().outbox(str(user.pk)) == []


# -- the batcher alone ------------------------------------------------------------------------
def collector() -> tuple[list[list[int]], threading.Event, Any]:
    batches: list[list[int]] = []
    arrived = threading.Event()

    def send(batch: list[Any]) -> None:
        batches.append([p["n"] for p in batch])
        arrived.set()

    return batches, arrived, send


def thread_collector() -> tuple[list[list[int]], threading.Event, list[str], Any]:
    """``collector``, also noting which thread sent each batch."""
    senders: list[str] = []
    batches, arrived, collect = collector()

    def send(batch: list[Any]) -> None:
        senders.append(threading.current_thread().name)
        collect(batch)

    return batches, arrived, senders, send


def test_the_batcher_thread_sends_every_interval():
    batches, arrived, send = collector()
    batcher = Batcher(send, interval=lambda: 0.05, size=lambda: 100)
    for n in range(3):
        batcher.add({"n": n})
    assert arrived.wait(2)
    assert batches == [[0, 1, 2]]


def test_add_nowait_leaves_a_full_batch_to_the_batch_thread():
    batches, arrived, senders, send = thread_collector()
    batcher = Batcher(send, interval=lambda: 3600, size=lambda: 2)
    batcher.add_nowait({"n": 1})
    batcher.add_nowait({"n": 2})  # full: the thread is woken, the caller sends nothing
    assert arrived.wait(5)  # long before the hour the thread would otherwise sleep
    assert batches == [[1, 2]] and senders == ["quotas-ledger-batch"]


def test_an_urgent_payload_wakes_the_batch_thread_for_the_whole_batch():
    batches, arrived, senders, send = thread_collector()
    batcher = Batcher(send, interval=lambda: 3600, size=lambda: 100)
    batcher.add({"n": 1})
    assert not arrived.wait(0.3)  # the next tick is an hour away
    batcher.add({"n": 2}, urgent=True)  # no copy anywhere else: it must not wait
    assert arrived.wait(5)
    assert batches == [[1, 2]] and senders == ["quotas-ledger-batch"]
    arrived.clear()
    batcher.add_nowait({"n": 3}, urgent=True)
    assert arrived.wait(5)
    assert batches == [[1, 2], [3]] and senders == ["quotas-ledger-batch"] * 2


def test_a_record_redis_did_not_take_is_sent_at_once_the_others_at_the_tick(
    user, quota_config, dead_cache
):
    """A settle Redis took has its record in the outbox too, so the record waits for the
    batch's tick; one made while Redis was unreachable exists only in this process, so it
    is sent (with the batch) at once, not a tick later."""
    batcher = ledger_engine.ledger_batcher()
    batches, arrived, collect = collector()
    sent = mock.patch.object(batcher, "_send", lambda batch: collect([{"n": 0}] * len(batch)))
    with sent:
        served = serve(user, 2, total_tokens=10)
        assert not arrived.wait(0.3)  # in the outbox: the batch waits for its tick
        stranded = services.reserve(user, 100)
        quota_config(CACHE_ALIAS=dead_cache, LEDGER_BATCH_SECONDS=3600)  # Redis unreachable
        outcome = services.settle(stranded, total_tokens=40)
        assert outcome.remaining is None  # Redis never heard of it: the ledger only
        assert arrived.wait(5)
    assert batches == [[0, 0, 0]]  # the two that could wait went with it
    assert [s.actual_tokens for s in served] == [10, 10]


def test_a_failing_send_is_logged_not_raised(caplog):
    def send(batch: list[Any]) -> None:
        raise RuntimeError("down")

    batcher = Batcher(send, interval=lambda: 3600, size=lambda: 1)
    batcher.add({"n": 1})  # full at once: sent (and failed) in the caller's thread
    assert "quotas-ledger-batch could not send 1 records" in caplog.text
    assert len(batcher) == 0


# A process whose batch thread is sending when the process exits: the exit hook must wait
# for that batch (the thread is a daemon, stopped where it stands once the hooks have run).
EXIT_WHILE_SENDING = """
import sys, threading, time
from quotas.engine.batching import Batcher

out = open(sys.argv[1], "a")
sending = threading.Event()

def send(batch):
    if threading.current_thread().name == "quotas-ledger-batch":
        sending.set()
        time.sleep(0.5)  # a slow database: still sending when the main thread ends
    out.write(repr([p["n"] for p in batch]) + "\\n")
    out.flush()

batcher = Batcher(send, interval=lambda: 0.01, size=lambda: 100)
batcher.add({"n": 1})
assert sending.wait(10)
batcher.add({"n": 2})  # left for the exit hook
"""


def test_the_exit_hook_waits_for_the_batch_the_thread_is_sending(tmp_path):
    sent = tmp_path / "sent"
    subprocess.run(
        [sys.executable, "-c", EXIT_WHILE_SENDING, str(sent)],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"},
        check=True,
        timeout=60,
    )
    assert sent.read_text().splitlines() == ["[1]", "[2]"]


def test_the_exit_hook_waits_for_a_stuck_send_only_so_long(caplog):
    release = threading.Event()
    batches, _arrived, collect = collector()

    def send(batch: list[Any]) -> None:
        release.wait(10)
        collect(batch)

    batcher = Batcher(send, interval=lambda: 3600, size=lambda: 1)
    stuck = threading.Thread(target=batcher.add, args=({"n": 1},))  # full: sent by this thread
    stuck.start()
    while not batcher._sending:
        time.sleep(0.01)
    started = time.monotonic()
    assert batcher.flush_at_exit(timeout=0.2) == 0
    assert 0.2 <= time.monotonic() - started < 5
    assert "quotas-ledger-batch still sending a batch after 0.2 s at exit" in caplog.text
    release.set()
    stuck.join()
    assert batches == [[1]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_batch_and_its_own_thread():
    read_end, write_end = os.pipe()

    def send(batch: list[Any]) -> None:
        os.write(write_end, repr([p["n"] for p in batch]).encode())

    parent = os.getpid()
    sent = threading.Event()

    def send_and_tell(batch: list[Any]) -> None:
        send(batch)
        sent.set()

    # The parent's thread waits an hour (the pipe shows the child's batches only).
    batcher = Batcher(
        send_and_tell, interval=lambda: 3600 if os.getpid() == parent else 0.05, size=lambda: 100
    )
    batcher.add({"n": "parent"})
    pid = os.fork()
    if pid == 0:  # the child: only its own record, sent by its own thread
        try:
            batcher.add({"n": "child"})
            sent.wait(60)  # the child's thread sent its batch (a bound on a hang, not a wait)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(write_end)
    child_sent = os.read(read_end, 1000).decode()
    os.close(read_end)
    assert child_sent == "['child']"
    assert len(batcher) == 1  # the parent's record is still the parent's
    batcher._pending.clear()  # nothing for the exit hook to send to the closed pipe


@pytest.mark.django_db(transaction=True)
def test_the_batcher_thread_closes_the_database_connection_a_batch_opened():
    from django.db import connections

    opened = []

    def send(batch: list[Any]) -> None:  # as when the broker is down: rows written directly
        connection = connections["default"]  # this thread's own
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        opened.append(connection)

    batcher = Batcher(send, interval=lambda: 0.02, size=lambda: 100)
    batcher.add({"n": 1})
    deadline = time.monotonic() + 5
    while not opened or opened[0].connection is not None:
        assert time.monotonic() < deadline, "the thread kept its database connection"
        time.sleep(0.02)
