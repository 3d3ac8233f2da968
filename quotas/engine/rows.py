"""Writing ledger rows so that one record the database refuses never blocks another.

Every record becomes a row. A record with a field the ledger cannot store (a model name over
its column or with control characters, an id over its column, a figure out of range: records
made before names were validated, or by code that called the store directly) is written
*repaired*: each such field made storable, and the row flagged by a model name that starts
with ``REPAIRED_MARK``, with the original values in an error log line. The tokens, which the
windows are rebuilt from, are kept exactly whenever they fit the column.

If the database still refuses a row (a constraint this code does not know), its record is
kept aside in Redis (``<prefix>:{<quota key>}:dead``, for 30 days) with the database's
reason, logged as an error, and never tried again; the other rows are written. Only errors of
the database itself (unreachable, read-only, out of connections) propagate, so the caller
retries the whole batch later: a record is never dropped for an outage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from django.contrib.auth import get_user_model
from django.db import DataError, IntegrityError, connections, router, transaction

from quotas.backends.redis import LedgerEntry, RedisWindowStore
from quotas.core.bounds import MAX_MODEL_LENGTH
from quotas.engine.rollups import roll_up
from quotas.engine.runtime import get_store, guarded
from quotas.exceptions import StoreUnavailable
from quotas.models import Team, UsageRecord
from quotas.signals import reservation_expired

__all__ = [
    "REPAIRED_MARK",
    "insert_rows",
    "repaired",
    "row_of",
    "user_id_of_scope",
    "users_of_scopes",
    "write_rows",
    "write_scope_rows",
    "write_usage",
]

logger = logging.getLogger("quotas")

REPAIRED_MARK = "[repaired] "
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ID_LENGTH = UsageRecord._meta.get_field("request_id").max_length or 200
MAX_FIGURE = 2**63 - 1  # a PositiveBigIntegerField
# Millisecond timestamps a DateTimeField can hold (years 1970 to 9999).
MAX_MS = (datetime(9999, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
STATUSES = frozenset(UsageRecord.Status.values)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What a row's own values can make the database refuse (any other error is the database's).
REFUSALS = (DataError, IntegrityError, ValueError, TypeError, OverflowError)


def write_rows(
    store: RedisWindowStore, scope: str, entries: list[LedgerEntry], user_id: int | None
) -> int:
    """Create the rows of these records that do not exist yet; return how many were created.

    Records are repaired first when a field cannot be stored (see the module docstring);
    a row the database refuses anyway goes to the dead-letter hash in ``store``."""
    return _write(store, entries, {scope: user_id})


def _write(
    store: RedisWindowStore, entries: list[LedgerEntry], users: dict[str, int | None]
) -> int:
    """``write_rows`` for records of any quota keys (``users``: each key's user): one query
    for the rows that exist, one bulk insert, one transaction, whatever the keys."""
    if not entries:
        return 0
    entries = [_checked(entry) for entry in entries]
    existing = existing_ids([entry.reservation_id for entry in entries])
    new = [entry for entry in entries if entry.reservation_id not in existing]
    teams = _teams(new)
    try:
        with transaction.atomic():
            rows = [row_values(e, users.get(e.scope), teams=teams) for e in new]
            insert_rows(rows)
            # In this transaction: rows not created are never rolled up.
            roll_up(SimpleNamespace(**values) for values in rows)
    except REFUSALS:
        # A concurrent writer (the sweep, or another batch) wrote some of them first, or the
        # database refused a row: one row at a time (one transaction, a savepoint each), so
        # each row is created, and counted, exactly once, and a refused one is set aside alone.
        with transaction.atomic():
            new = [e for e in new if _insert_one(store, e, users.get(e.scope), teams)]
    for entry in new:
        _announce_expired(entry.scope, [entry])
    return len(new)


def user_id_of_scope(scope: str) -> int | None:
    """The user a quota key belongs to, if it is a user's key and the user still exists."""
    if not scope.isdigit():
        return None
    pk = int(scope)
    return pk if get_user_model().objects.filter(pk=pk).exists() else None


def write_usage(payloads: Iterable[dict[str, Any]]) -> int:
    """Write the rows of these ledger records (``services.usage_payload`` dicts) that do not
    exist yet, then drop their outbox copies; returns the rows created. Idempotent.

    A payload that cannot be read is logged and skipped (its outbox copy still reaches the
    ledger through ``flush_ledger``); a record the database refuses is written repaired or set
    aside (see the module docstring), never retried: only a database outage raises."""
    by_scope: dict[str, list[LedgerEntry]] = {}
    for payload in payloads:
        try:
            entry = LedgerEntry.from_payload(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.error("quotas: unreadable usage record skipped (%r): %.500r", exc, payload)
            continue
        by_scope.setdefault(entry.scope, []).append(entry)
    store = get_store()
    # The whole batch in one bulk insert and one transaction (a commit per quota key made
    # the worker's rate that of the database's fsyncs: about 100 rows/s over 100 users).
    everything = [entry for entries in by_scope.values() for entry in entries]
    created = _write(store, everything, users_of_scopes(by_scope))
    acks = {scope: [entry.reservation_id for entry in es] for scope, es in by_scope.items()}
    try:
        # Through the breaker: while Redis is known to be down, no wait for a timeout here
        # (with the broker down too, this runs on a request's path).
        guarded(store.ack_outboxes, acks)
    except StoreUnavailable:  # the sweep finds their rows written and drops them later
        logger.info(
            "quotas: Redis unavailable; outboxes of %d keys left to the sweep", len(by_scope)
        )
    return created


# From this many rows a batch is sent to PostgreSQL with COPY (below, one INSERT).
COPY_MIN_ROWS = 20


def insert_rows(rows: list[dict[str, Any]]) -> None:
    """Insert these new rows (``row_values`` dicts) in one statement: on PostgreSQL
    (psycopg 3) a ``COPY``, elsewhere ``bulk_create``. Django builds a multi-row INSERT
    value by value (a few hundred microseconds a row on a busy machine), which capped one
    worker well below 5,000 rows/s; ``COPY`` streams the values in psycopg's C code. Either
    way a duplicate request id makes the whole statement fail (``IntegrityError``), as
    ``bulk_create`` does."""
    connection = connections[router.db_for_write(UsageRecord)]
    if connection.vendor != "postgresql" or len(rows) < COPY_MIN_ROWS:
        UsageRecord.objects.bulk_create([UsageRecord(**values) for values in rows])
        return
    fields = _insert_fields()
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    with connection.cursor() as cursor:
        raw = cursor.cursor
        if not hasattr(raw, "copy"):  # psycopg2: no COPY of Python rows
            UsageRecord.objects.bulk_create([UsageRecord(**values) for values in rows])
            return
        names = [field.attname for field in fields]
        # Django's own errors (IntegrityError, DataError), as from bulk_create: the raw
        # cursor would raise psycopg's, which the callers would take for an outage.
        with (
            connection.wrap_database_errors,
            raw.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
        ):
            for values in rows:
                copy.write_row([values[name] for name in names])


def existing_ids(ids: list[str]) -> set[str]:
    """Which of these request ids have their row already. On PostgreSQL one array parameter
    (``= ANY(%s)``), not one parameter per id: psycopg binds parameters in Python, and a few
    hundred of them cost more than the query itself."""
    connection = connections[router.db_for_read(UsageRecord)]
    if connection.vendor != "postgresql":
        rows = UsageRecord.objects.filter(request_id__in=ids)
        return set(rows.values_list("request_id", flat=True))
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT request_id FROM {table} WHERE request_id = ANY(%s)", [ids])
        return {row[0] for row in cursor.fetchall()}


def _insert_fields() -> list[Any]:
    """The columns an insert writes: every concrete field but the id and generated ones."""
    meta = UsageRecord._meta
    return [
        field
        for field in meta.concrete_fields
        if field is not meta.pk and not getattr(field, "generated", False)
    ]


def users_of_scopes(scopes: Iterable[str]) -> dict[str, int | None]:
    """The user of each quota key that is a user's key of a user who still exists (one
    query for them all)."""
    pks = {int(scope) for scope in scopes if scope.isdigit()}
    found = set(get_user_model().objects.filter(pk__in=pks).values_list("pk", flat=True))
    return {
        scope: int(scope) if scope.isdigit() and int(scope) in found else None for scope in scopes
    }


def write_scope_rows(scope: str, entries: list[LedgerEntry], store: RedisWindowStore) -> int:
    """Create the rows of these records that do not exist yet (see ``write_rows``)."""
    if not entries:
        return 0
    return write_rows(store, scope, entries, user_id_of_scope(scope))


def _teams(entries: list[LedgerEntry]) -> set[int]:
    """The teams of these records that still exist (a deleted team's rows keep none)."""
    named = {int(entry.team) for entry in entries if entry.team.isdigit()}
    if not named:
        return set()
    return set(Team.objects.filter(pk__in=named).values_list("pk", flat=True))


def row_of(
    entry: LedgerEntry,
    user_id: int | None,
    now_ms: int | None = None,
    teams: set[int] | None = None,
) -> UsageRecord:
    """The ``UsageRecord`` of one ledger record (not saved); its team only when it is one of
    ``teams`` (the teams that still exist)."""
    return UsageRecord(**row_values(entry, user_id, now_ms, teams))


def row_values(
    entry: LedgerEntry,
    user_id: int | None,
    now_ms: int | None = None,
    teams: set[int] | None = None,
) -> dict[str, Any]:
    """``row_of``'s field values (by attribute name), without making a model instance."""
    settled_at = entry.settled_at_ms if entry.settled_at_ms is not None else now_ms
    team = int(entry.team) if entry.team.isdigit() else None
    return dict(
        request_id=entry.reservation_id,
        scope=entry.scope,
        user_id=user_id,
        team_id=team if teams is not None and team in teams else None,
        estimated_cost=_figure(entry.estimated_cost),
        cost=_figure(entry.cost),
        model=entry.model,
        estimated_tokens=entry.estimate,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        actual_tokens=entry.actual,
        status=entry.status,
        created_at=_moment(entry.reserved_at_ms),
        settled_at=_moment(settled_at) if settled_at is not None else _moment(_now_ms()),
    )


def repaired(entry: LedgerEntry) -> LedgerEntry | None:
    """``entry`` with every field the ledger cannot store made storable and its model flagged
    with ``REPAIRED_MARK``; ``None`` when every field can be stored as it is."""
    fixed = dataclasses.replace(
        entry,
        reservation_id=_storable_id(entry.reservation_id),
        scope=_storable_id(entry.scope),
        status=entry.status if entry.status in STATUSES else str(UsageRecord.Status.SETTLED),
        estimate=_figure(entry.estimate),
        actual=_figure(entry.actual),
        prompt_tokens=None if entry.prompt_tokens is None else _figure(entry.prompt_tokens),
        completion_tokens=(
            None if entry.completion_tokens is None else _figure(entry.completion_tokens)
        ),
        reserved_at_ms=min(max(entry.reserved_at_ms, 0), MAX_MS),
        settled_at_ms=(
            None if entry.settled_at_ms is None else min(max(entry.settled_at_ms, 0), MAX_MS)
        ),
        model=_storable_text(entry.model, MAX_MODEL_LENGTH),
    )
    if fixed == entry:
        return None
    model = REPAIRED_MARK + _storable_text(entry.model, MAX_MODEL_LENGTH - len(REPAIRED_MARK))
    return dataclasses.replace(fixed, model=model)


def _checked(entry: LedgerEntry) -> LedgerEntry:
    fixed = repaired(entry)
    if fixed is None:
        return entry
    logger.error(
        "quotas: ledger record %s has fields the ledger cannot store; written repaired "
        "(model flagged %r). Original record: %s",
        fixed.reservation_id,
        REPAIRED_MARK.strip(),
        _describe(entry),
    )
    return fixed


def _insert_one(
    store: RedisWindowStore, entry: LedgerEntry, user_id: int | None, teams: set[int]
) -> bool:
    """Insert one row; ``False`` when it already exists or was set aside (refused)."""
    try:
        with transaction.atomic():
            row = row_of(entry, user_id, teams=teams)
            row.save(force_insert=True)
            roll_up([row])
    except REFUSALS as exc:
        if UsageRecord.objects.filter(request_id=entry.reservation_id).exists():
            return False  # written by a concurrent writer: not ours to count
        _set_aside(store, entry, exc)
        return False
    return True


def _set_aside(store: RedisWindowStore, entry: LedgerEntry, exc: Exception) -> None:
    """Keep a record the database refused in the dead-letter hash, with the reason."""
    reason = f"{type(exc).__name__}: {exc}"[:500]
    logger.error(
        "quotas: the database refused ledger record %s (%s); kept aside in Redis, not retried. "
        "Record: %s",
        entry.reservation_id,
        reason,
        _describe(entry),
    )
    record = json.dumps({**_fields(entry), "reason": reason}, default=str)
    try:
        store.dead_letter(entry.scope, entry.reservation_id, record)
    except StoreUnavailable:
        logger.error(
            "quotas: Redis unavailable; ledger record %s is in this log only", entry.reservation_id
        )


def _announce_expired(scope: str, entries: list[LedgerEntry]) -> None:
    for entry in entries:
        if entry.status == UsageRecord.Status.EXPIRED:
            reservation_expired.send(
                sender=UsageRecord,
                scope=scope,
                reservation_id=entry.reservation_id,
                estimated_tokens=entry.estimate,
            )


def _storable_id(value: str) -> str:
    """An id that fits its column: cut, with a hash of the whole so it stays unique (and the
    same for the same id, so a re-delivered record still finds its row)."""
    text = value.replace("\x00", "")
    if len(text) <= ID_LENGTH and text == value:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[: ID_LENGTH - 17]}#{digest}"


def _storable_text(value: str, length: int) -> str:
    text = _CONTROL.sub("\ufffd", value)
    return text if len(text) <= length else text[: length - 1] + "\u2026"


def _figure(value: int) -> int:
    return min(max(int(value), 0), MAX_FIGURE)


def _fields(entry: LedgerEntry) -> dict[str, object]:
    """The record's fields, long texts cut (a log line must not carry a megabyte)."""
    fields = dataclasses.asdict(entry)
    return {key: _cut(value) for key, value in fields.items()}


def _cut(value: object) -> object:
    return value[:300] + "..." if isinstance(value, str) and len(value) > 300 else value


def _describe(entry: LedgerEntry) -> str:
    return json.dumps(_fields(entry), default=str)


def _moment(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def _now_ms() -> int:
    return (datetime.now(UTC) - EPOCH) // timedelta(milliseconds=1)
