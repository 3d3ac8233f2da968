"""One ledger record the database refuses never blocks another: on the configured database
(PostgreSQL refuses a value over its column with ``DataError``; SQLite stores anything).

Records with fields the ledger cannot store are made here the way they reached Redis before
names were validated: by the store directly, below the services' checks."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any
from unittest import mock

import pytest
from django.db import DataError, OperationalError

from quotas import ledger, services
from quotas.core.decisions import DecisionStatus
from quotas.engine import reconcile
from quotas.engine.rows import REPAIRED_MARK
from quotas.models import UsageRecord
from quotas.tasks import flush_ledger_task, record_usage_task
from tests.core.test_redis_store import Plan, counters

pytestmark = pytest.mark.django_db(transaction=True)

LONG_MODEL = "m" * 990_000  # what SQLite stored before (a 5 MB ledger from 5 requests)


@pytest.fixture
def users(make_plan, make_user):
    plan = make_plan(tokens_per_hour=100_000)
    return [make_user(plan=plan) for _ in range(3)]


def settled_in_store(user: Any, model: str, tokens: int = 100, rid: str = "bad") -> str:
    """A reservation made and settled by the store directly (no name check), so its record
    waits in the user's outbox; returns its id."""
    store, scope = services.get_store(), str(user.pk)
    reservation_id = f"{scope}/{rid}"
    mine = [replace(c, tag=scope) for c in counters(store, Plan(100_000))]
    result = store.reserve(
        scope,
        reservation_id,
        mine,
        [tokens],
        ttl_ms=60_000,
        primary=1,
        tokens=tokens,
        model=model,
        seeds={1: ("e1", [])},
    )
    assert result.status is DecisionStatus.ALLOWED
    store.settle(
        scope, reservation_id, mine, actual_tokens=tokens - 10, epoch="e1", primary=1, model=model
    )
    return reservation_id


def test_a_model_over_the_column_is_written_repaired_and_the_sweep_reaches_everyone(users, caplog):
    # The bad record's user sorts first, so before, the sweep stopped there on PostgreSQL.
    first, *others = sorted(users, key=lambda u: str(u.pk))
    bad = settled_in_store(first, LONG_MODEL)
    good = [settled_in_store(user, "gpt-4", rid="good") for user in others]
    with caplog.at_level(logging.ERROR, logger="quotas"):
        assert ledger.flush_ledger() == 1 + len(good)
    row = UsageRecord.objects.get(request_id=bad)
    assert row.model.startswith(REPAIRED_MARK) and len(row.model) == 200
    assert (row.estimated_tokens, row.actual_tokens) == (100, 90)  # the usage is exact
    assert UsageRecord.objects.filter(request_id__in=good).count() == len(good)
    assert any("cannot store" in r.getMessage() and bad in r.getMessage() for r in caplog.records)
    assert ledger.flush_ledger() == 0  # nothing left behind to retry
    assert services.get_store().outbox(str(first.pk)) == []


def test_control_characters_in_a_stored_model_are_repaired(users):
    bad = settled_in_store(users[0], "gpt-4\x00\r\nX")
    ledger.flush_ledger()
    row = UsageRecord.objects.get(request_id=bad)
    assert row.model == REPAIRED_MARK + "gpt-4\ufffd\ufffd\ufffdX"


def test_a_record_usage_batch_with_a_bad_record_writes_all_and_never_retries(users):
    payloads = []
    for user, model in zip(users, ["gpt-4", "x" * 5000, "gpt-4"], strict=True):
        reservation = services.reserve(user, 40, model="gpt-4")
        payload = services.usage_payload(reservation, 40, 30, 10, "settled")
        payloads.append({**payload, "model": model})
    payloads.append({"not": "a usage record"})  # unreadable: logged and skipped
    # Before: DataError on PostgreSQL, retried for ever with the whole batch unwritten.
    assert record_usage_task.apply(args=[payloads]).get() == 3
    models = sorted(UsageRecord.objects.values_list("model", flat=True), key=len)
    assert models[:2] == ["gpt-4", "gpt-4"] and models[2] == REPAIRED_MARK + "x" * 188 + "\u2026"
    assert record_usage_task.apply(args=[payloads]).get() == 0  # re-delivered: nothing new


def test_a_row_the_database_refuses_anyway_is_set_aside_and_the_rest_written(users, caplog):
    refused = settled_in_store(users[0], "gpt-4", rid="refused")
    fine = settled_in_store(users[0], "gpt-4", rid="fine")
    real_save = UsageRecord.save

    def save(row: UsageRecord, *args: Any, **kwargs: Any) -> None:
        if row.request_id == refused:  # a constraint this code does not know about
            raise DataError("value violates a rule of this database")
        real_save(row, *args, **kwargs)

    with (
        mock.patch.object(UsageRecord.objects, "bulk_create", side_effect=DataError("batch")),
        mock.patch.object(UsageRecord, "save", save),
        caplog.at_level(logging.ERROR, logger="quotas"),
    ):
        assert ledger.flush_ledger() == 1
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == [fine]
    store = services.get_store()
    kept = store.dead_letters(str(users[0].pk))[refused]
    assert "violates a rule" in kept["reason"] and kept["actual"] == 90
    assert store.outbox(str(users[0].pk)) == []  # never tried again
    assert any(refused in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_an_unreadable_outbox_record_is_set_aside(users, redis_client):
    good = settled_in_store(users[0], "gpt-4", rid="good")
    store = services.get_store()
    outbox = store.keys(str(users[0].pk))[4]
    redis_client.hset(outbox, f"{users[0].pk}/garbage", "s:not:numbers")
    assert ledger.flush_ledger() == 1
    assert UsageRecord.objects.filter(request_id=good).exists()
    assert f"{users[0].pk}/garbage" in store.dead_letters(str(users[0].pk))


def test_one_quota_key_that_fails_never_stops_the_sweep_of_the_others(users):
    ids = [settled_in_store(user, "gpt-4", rid="good") for user in users]
    failing = str(sorted(users, key=lambda u: str(u.pk))[0].pk)
    real = ledger.flush_scope

    def flush_scope(store: Any, scope: str, **kwargs: Any) -> int:
        if scope == failing:
            raise OperationalError("the database went away for this one")
        return real(store, scope, **kwargs)

    with mock.patch.object(reconcile, "flush_scope", flush_scope), pytest.raises(OperationalError):
        ledger.flush_ledger()
    written = set(UsageRecord.objects.values_list("request_id", flat=True))
    assert written == {rid for rid in ids if not rid.startswith(f"{failing}/")}
    assert flush_ledger_task.apply().get() == 1  # the next sweep writes the last one


def test_long_request_ids_from_host_code_are_refused_before_reserving(users):
    from quotas.core.bounds import InvalidRequest

    with pytest.raises(InvalidRequest, match="request id") as caught:
        services.reserve(users[0], 10, request_id="r" * 300)
    assert caught.value.param == "request_id"
    assert services.budget_for(users[0])["used"] == 0
