"""Reconciliation between the Redis windows and the usage ledger (the source of truth).

Plain functions; ``quotas.tasks`` wraps them in Celery tasks and the ``quotas_rebuild``
command calls them. Every function is idempotent, so a re-delivered task changes nothing:

- ``flush_ledger``: write the ledger rows waiting in the Redis outbox, in bulk, exactly once
  (a row is written before its outbox record is dropped, and ``request_id`` is unique). A
  settle puts its record there atomically with the settle; reservations never settled within
  their TTL are moved there first, charged at their estimate.
- ``audit_windows``: repair drift between a window and the ledger (usage recorded while Redis
  was down, settles that never reached Redis), by compare-and-set of absolute bucket figures.
- ``rebuild_windows``: seed lost windows from the ledger now, instead of on each user's next
  request.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas.backends.redis import RedisWindowStore, WindowContents
from quotas.conf import quota_settings
from quotas.core.types import WindowSpec
from quotas.engine.counters import all_counters, primary_index
from quotas.engine.lookup import reservation_of
from quotas.engine.plans import config_for
from quotas.engine.rows import write_scope_rows
from quotas.engine.runtime import get_store, window_spec
from quotas.engine.seeding import counter_seeds
from quotas.exceptions import ConfigurationError
from quotas.models import UsageRecord

__all__ = [
    "AuditOutcome",
    "audit_window",
    "audit_windows",
    "flush_ledger",
    "rebuild_window",
    "rebuild_windows",
]

logger = logging.getLogger("quotas")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A settle reaches Redis before its ledger row is written (the row goes through the task
# queue). The audit never lowers a bucket young enough to have such a row still in flight.
SETTLE_GRACE_SECONDS = 60.0


def _ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch, in integer arithmetic (no float rounding)."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def _moment(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


# -- the outbox -----------------------------------------------------------------------------
def flush_ledger(*, batch: int = 500, scan: bool | None = None) -> int:
    """Write every ledger row waiting in the Redis outbox, after moving the reservations past
    their TTL there (charged at their estimate); return the rows created.

    The keys with work are found in two registries the scripts keep (outboxes holding
    records, reservations past their deadline), not by scanning Redis. ``scan=True`` also
    finds them by ``SCAN`` (keys written before the registries existed); by default that
    happens once every ``SCAN_EVERY_SECONDS`` per key prefix. Safe to run concurrently and
    repeatedly. One quota key that cannot be swept never stops the sweep of the others: they
    are all tried, and the first failure is raised afterwards (the task retries; what was
    written stays written).
    """
    store = get_store()
    scopes = set(store.backlog_scopes()) | set(store.due_scopes())
    if scan or (scan is None and store.claim_scan(SCAN_EVERY_SECONDS)):
        scopes |= set(store.iter_scopes("p")) | set(store.iter_scopes("x"))
    created, failures = 0, []
    for scope in sorted(scopes):
        try:
            created += flush_scope(store, scope, batch=batch)
        except Exception as exc:  # the database or Redis failed for this key: go on
            failures.append((scope, exc))
    if failures:
        scope, first = failures[0]
        logger.warning(
            "quotas: flush_ledger could not sweep %d of %d quota keys (first: %s: %r)",
            len(failures),
            len(scopes),
            scope,
            first,
        )
        raise first
    return created


# How often the sweep also scans Redis for outboxes and pending reservations the registries
# may not know (written before they existed); a Redis that lost its data is scanned at once.
SCAN_EVERY_SECONDS = 24 * 3600


def flush_scope(store: RedisWindowStore, scope: str, *, batch: int = 500) -> int:
    """Expire one quota key's overdue reservations and write its outbox, ``batch`` at a time."""
    created = 0
    while True:
        moved = store.expire(scope, batch=batch)
        entries = store.outbox(scope, batch=batch)
        created += write_scope_rows(scope, entries, store)
        # Only after the rows are committed: a crash before this line leaves the records in
        # the outbox, and the next sweep finds their rows already written. Acknowledging
        # nothing still drops an empty outbox from the backlog registry.
        store.ack_outbox(scope, [entry.reservation_id for entry in entries])
        if moved < batch and len(entries) < batch:
            return created


# -- audit ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditOutcome:
    """What the audit of one quota key did: settles replayed into Redis, and tokens added to
    (positive) or removed from (negative) its window. ``skipped``: no window to audit."""

    scope: str
    replayed: int = 0
    adjusted: int = 0
    skipped: bool = False


def audit_windows(*, settle_grace_seconds: float = SETTLE_GRACE_SECONDS) -> list[AuditOutcome]:
    """Audit every window in Redis against the ledger; return the keys that changed.

    Keys with ledger rows but no window in Redis need no audit: their window is seeded from
    the ledger when it is next built.
    """
    store = get_store()
    outcomes = [
        audit_window(scope, settle_grace_seconds=settle_grace_seconds, store=store)
        for scope in sorted(set(store.iter_scopes("w")))
    ]
    return [outcome for outcome in outcomes if outcome.replayed or outcome.adjusted]


def audit_window(
    scope: str,
    *,
    settle_grace_seconds: float = SETTLE_GRACE_SECONDS,
    store: RedisWindowStore | None = None,
) -> AuditOutcome:
    """Make one window agree with the ledger, without ever counting a request twice.

    1. A reservation still pending in Redis that already has a ledger row was settled while
       Redis was unreachable: its settle is replayed (idempotent, by reservation id).
    2. Each live bucket should hold the ledger's tokens of the requests reserved in it, plus
       the estimates of reservations (pending, or expired awaiting their row) with no row.
       Buckets are set to that figure by compare-and-set, with two guards against rows still
       in the task queue: a bucket holding more than the ledger says is lowered only once it
       is older than the reservation TTL plus ``settle_grace_seconds``; and raising buckets
       never takes the window above the ledger's total for it.
    """
    store = store or get_store()
    contents = store.window_contents(scope)
    if not contents.epoch:
        return AuditOutcome(scope, skipped=True)
    replayed = _replay_settles(store, scope, contents)
    if replayed:
        contents = store.window_contents(scope)
        if not contents.epoch:
            return AuditOutcome(scope, replayed=replayed)
    expected = _expected(scope, contents, store.spec)
    changes = _bucket_changes(contents, expected, store.spec, settle_grace_seconds)
    adjusted = store.repair_buckets(scope, contents.epoch, changes) if changes else 0
    if adjusted:
        logger.warning("quotas: audit moved the window of %s by %+d tokens", scope, adjusted)
    return AuditOutcome(scope, replayed=replayed, adjusted=adjusted or 0)


def _replay_settles(store: RedisWindowStore, scope: str, contents: WindowContents) -> int:
    rows = UsageRecord.objects.filter(request_id__in=list(contents.pending)).exclude(
        status=UsageRecord.Status.EXPIRED
    )
    replayed = 0
    for request_id, actual, cost in rows.values_list("request_id", "actual_tokens", "cost"):
        held = reservation_of(request_id)  # the counters it charged, from its record
        result = store.settle(
            scope,
            request_id,
            held.counters,
            actual_tokens=actual,
            actual_cost=cost if held.price else None,
            epoch=contents.epoch,
            primary=held.primary,
        )
        replayed += int(result.status == 1)
    return replayed


def _expected(scope: str, contents: WindowContents, spec: WindowSpec) -> Counter[int]:
    """Tokens each live bucket should hold, by the ledger (since the last admin reset).

    The outbox's records are ledger rows not yet written: they count like rows.
    """
    since_ms = max(contents.first_bucket * spec.bucket_ms, contents.reset_ms + 1)
    rows = UsageRecord.objects.filter(scope=scope, created_at__gte=_moment(since_ms))
    expected: Counter[int] = Counter()
    recorded = set()
    for request_id, created_at, tokens in rows.values_list(
        "request_id", "created_at", "actual_tokens"
    ).iterator():
        expected[spec.bucket_of(_ms(created_at))] += tokens
        recorded.add(request_id)
    for entry in contents.outbox:
        if entry.reservation_id not in recorded and entry.reserved_at_ms >= since_ms:
            expected[spec.bucket_of(entry.reserved_at_ms)] += entry.actual
        recorded.add(entry.reservation_id)
    reset_bucket = spec.bucket_of(contents.reset_ms) if contents.reset_ms else None
    held = {
        rid: entry
        for rid, entry in contents.pending.items()
        if reset_bucket is None or entry[0] > reset_bucket  # reserved before a reset: gone
    }
    unrecorded = {rid for rid in held if rid not in recorded}
    # A held reservation's row may be older than the window's first bucket: look it up too.
    unrecorded -= set(
        UsageRecord.objects.filter(request_id__in=unrecorded).values_list("request_id", flat=True)
    )
    for rid in unrecorded:
        bucket, estimate = held[rid]
        expected[bucket] += estimate
    return expected


def _bucket_changes(
    contents: WindowContents, expected: Counter[int], spec: WindowSpec, grace_seconds: float
) -> list[tuple[int, int, int]]:
    """``(bucket, tokens read, tokens to set)`` for the buckets the audit may repair now."""
    ttl_ms = int(quota_settings.RESERVATION_TTL_SECONDS * 1000)
    settled_before = spec.bucket_of(contents.now_ms - ttl_ms - int(grace_seconds * 1000))
    raises: list[tuple[int, int, int]] = []
    lowers: list[tuple[int, int, int]] = []
    young_excess = 0
    for bucket in range(contents.first_bucket, contents.current_bucket + 1):
        seen, want = contents.buckets.get(bucket, 0), expected.get(bucket, 0)
        if want > seen:
            raises.append((bucket, seen, want))
        elif want < seen and bucket < settled_before:
            lowers.append((bucket, seen, want))
        elif want < seen:
            young_excess += seen - want
    return lowers + _capped(raises, young_excess)


def _capped(raises: list[tuple[int, int, int]], excess: int) -> list[tuple[int, int, int]]:
    """Raises, less ``excess`` tokens (the newest buckets give way first)."""
    capped = []
    for bucket, seen, want in sorted(raises, reverse=True):
        cut = min(excess, want - seen)
        excess -= cut
        if want - cut > seen:
            capped.append((bucket, seen, want - cut))
    return capped


# -- rebuild --------------------------------------------------------------------------------
def rebuild_windows(user_ids: Iterable[int] | None = None) -> list[str]:
    """Seed the lost windows of these users (default: every key with ledger rows in the last
    window) from the ledger now. Returns the keys rebuilt; windows that exist are untouched."""
    if user_ids is None:
        spec = window_spec()
        since = timezone.now() - timedelta(milliseconds=spec.window_ms + spec.bucket_ms)
        rows = UsageRecord.objects.filter(created_at__gt=since)
        scopes = sorted(set(rows.values_list("scope", flat=True)))
    else:
        scopes = [str(pk) for pk in user_ids]
    return [scope for scope in scopes if rebuild_window(scope)]


def rebuild_window(scope: str) -> bool:
    """Seed one window from the ledger if Redis lost it (it has no epoch). Returns whether it
    was rebuilt. Concurrent rebuilds and requests seed a window once: the script checks."""
    store = get_store()
    try:
        config = config_for(_user_of(scope), _address_of(scope))
    except ConfigurationError as exc:
        logger.warning("quotas: cannot rebuild the window of %s: %s", scope, exc)
        return False
    counters = all_counters(config, scope)
    primary = primary_index(counters)
    peek = store.peek(scope, counters, primary=primary)
    if not peek.unbuilt:
        return False
    team = config.team.id if config.team else None
    seeds = counter_seeds(scope, team, counters, peek.unbuilt)
    store.peek(scope, counters, primary=primary, seeds=seeds)
    logger.info("quotas: rebuilt the window of %s from the ledger", scope)
    return True


def _address_of(scope: str) -> str | None:
    return scope.removeprefix("anon-") if scope.startswith("anon-") else None


def _user_of(scope: str) -> Any:
    """The user of a quota key; ``None`` (anonymous limits) for an anonymous key."""
    if not scope.isdigit():
        return None
    user = get_user_model().objects.filter(pk=int(scope)).first()
    if user is None:
        raise ConfigurationError(f"user {scope} no longer exists")
    return user
