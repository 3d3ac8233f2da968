"""The maintained list of deliberate bugs ``make mutate`` plants in the engine, one at a time.

Each mutation names a file and an exact snippet that must occur in it exactly once (never a
line number, so it survives code moving within the file) and what to put in its place. When
the code it targets changes, ``make mutate`` reports the snippet as not found: update the
entry to the new code (or retire it with the code), so the list stays a true picture of what
the suite is known to catch.

Every entry is a bug a real change could plausibly introduce, and each one changes what a
user, a client or the ledger would see; the comment after each name says which test kills it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MUTATIONS", "Mutation"]

LUA = "quotas/backends/lua"


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace ``find`` (exactly one occurrence) in ``path`` by ``replace``.

    ``tests``: the pytest arguments that must catch it (``None``: the default fast subset).
    """

    name: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...] | None = None


MUTATIONS: list[Mutation] = [
    # -- reserve.lua ------------------------------------------------------------------------
    Mutation(
        "reserve: a client at its allowance of rejected attempts gets one more request",
        f"{LUA}/reserve.lua",
        "  if a.total >= attempts_limit then",
        "  if a.total > attempts_limit then",
        ("tests/core/test_attempts_store.py", "tests/test_http_rejected_attempts.py"),
    ),
    Mutation(
        "attempts: an attempt leaves the counter's 'no attempt counts after' moment as it was",
        f"{LUA}/attempt.lua",
        "if redis.call('HEXISTS', KEYS[2], 'ab') == 1 then",
        "if false then",
        ("tests/core/test_attempts_store.py",),
    ),
    Mutation(
        "reserve: a request that exactly fills a calendar period is refused",
        f"{LUA}/_window.lua",
        "  if w.total + w.amount <= w.budget then return 0 end",
        "  if w.total + w.amount < w.budget then return 0 end",
        ("tests/core/test_layers_store.py",),
    ),
    Mutation(
        "reserve: a reused reservation id is charged again",
        f"{LUA}/reserve.lua",
        "if redis.call('HSETNX', KEYS[2], rid, record) == 0 then status = 6 end",
        "if redis.call('HSET', KEYS[2], rid, record) < 0 then status = 6 end",
    ),
    Mutation(
        "reserve: a refused request is charged",
        f"{LUA}/reserve.lua",
        "if status == 1 then\n  local first_in_bucket = false",
        "if status ~= 6 then\n  local first_in_bucket = false",
    ),
    Mutation(
        "reserve: one request more than the concurrency limit is let in",
        f"{LUA}/reserve.lua",
        "    if in_flight >= concurrency then",
        "    if in_flight > concurrency then",
    ),
    Mutation(
        "reserve: one request more than the requests-per-minute limit is let in",
        f"{LUA}/reserve.lua",
        "    if wait > 0 and (refusing == 0 or wait > retry) then",
        "    if wait > 0 and refusing == 0 then",
    ),
    Mutation(
        "reserve: a request exactly at the per-request cap is a 413",
        "quotas/engine/reservations.py",
        "        if tokens > cap:",
        "        if tokens >= cap:",
    ),
    Mutation(
        "reserve: the plan's default output allowance is not added",
        "quotas/engine/reservations.py",
        "        tokens += config.limits.default_output_tokens",
        "        tokens += 0",
    ),
    # -- _window.lua (shared by every script) -----------------------------------------------
    Mutation(
        "window: tokens leave one bucket early (no token counts a full window)",
        f"{LUA}/_window.lua",
        "local nb = math.floor(window_ms / bucket_ms) + 1",
        "local nb = math.floor(window_ms / bucket_ms)",
    ),
    Mutation(
        "window: expired buckets never leave the running total",
        f"{LUA}/_window.lua",
        "        total = total - tonumber(v)\n",
        "        total = total\n",
    ),
    Mutation(
        "Retry-After: one bucket early",
        f"{LUA}/_window.lua",
        "if freed >= excess then return (b + w.nb) * w.bms - now end",
        "if freed >= excess then return (b + w.nb - 1) * w.bms - now end",
    ),
    Mutation(
        "window: the hash expires before the tokens it holds leave the window",
        f"{LUA}/_window.lua",
        "ttl = window_ms + 2 * bucket_ms,",
        "ttl = window_ms,",
    ),
    # -- settle.lua -------------------------------------------------------------------------
    Mutation(
        "settle: the difference goes to the current bucket, not the reservation's",
        f"{LUA}/_window.lua",
        "  local bucket = math.floor(created / w.bms)",
        "  local bucket = w.cur",
    ),
    Mutation(
        "settle: a refund to the oldest live bucket is dropped",
        f"{LUA}/_window.lua",
        "  if delta ~= 0 and bucket >= w.first then",
        "  if delta ~= 0 and bucket > w.first then",
    ),
    Mutation(
        "settle: a bucket may go negative (a refund after an admin reset gives extra budget)",
        f"{LUA}/_window.lua",
        "    if after <= 0 then  -- emptied",
        "    if after == 0 then  -- emptied",
    ),
    Mutation(
        "settle: the reserved figure is never released",
        f"{LUA}/settle.lua",
        "{'rv', math.max(w.reserved - estimate, 0)}",
        "{'rv', w.reserved}",
    ),
    Mutation(
        "settle: the concurrency slot is never released",
        f"{LUA}/settle.lua",
        "redis.call('ZREM', KEYS[1], rid)",
        "redis.call('ZSCORE', KEYS[1], rid)",
    ),
    Mutation(
        "settle: no figures refunds everything instead of keeping the estimate",
        f"{LUA}/settle.lua",
        "if actual < 0 then actual = estimate end",
        "if actual < 0 then actual = 0 end",
    ),
    Mutation(
        "settle: a reservation Redis lost is charged again on every repeat",
        f"{LUA}/settle.lua",
        "if redis.call('SET', KEYS[4], 1, 'NX', 'PX', primary.ttl) then",
        "if redis.call('SET', KEYS[4], 1, 'PX', primary.ttl) then",
    ),
    Mutation(
        "settle: a degraded request settled before its window is rebuilt loses its ledger row",
        f"{LUA}/settle.lua",
        "  if status ~= 0 then\n    if actual_cost < 0",
        "  if status == 2 then\n    if actual_cost < 0",
    ),
    Mutation(
        "settle: a degraded request whose reserve did reach Redis is charged again on a repeat",
        f"{LUA}/settle.lua",
        "if ARGV[5] ~= '' and primary and ARGV[5] ~= primary.epoch then",
        "if false then",
    ),
    # -- expire.lua -------------------------------------------------------------------------
    Mutation(
        "expire: reservations are expired before their deadline",
        f"{LUA}/expire.lua",
        "redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now,",
        "redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '+inf',",
    ),
    Mutation(
        "expire: an expired reservation stays reserved",
        f"{LUA}/expire.lua",
        "redis.call('HINCRBY', KEYS[1], 'rv', -estimate)",
        "redis.call('HINCRBY', KEYS[1], 'rv', 0)",
    ),
    # -- audit.lua and peek.lua -------------------------------------------------------------
    Mutation(
        "audit: no compare-and-set (a charge made during the audit is overwritten)",
        f"{LUA}/audit.lua",
        "and current == seen and target >= 0 then",
        "and target >= 0 then",
    ),
    Mutation(
        "audit: no epoch guard (an audit read before a rebuild writes into the new window)",
        f"{LUA}/audit.lua",
        "if redis.call('HGET', KEYS[1], 'e') ~= ARGV[6] then return {0, -1} end",
        "",
    ),
    Mutation(
        "peek: reserved tokens are left out of the budget's remaining figure",
        f"{LUA}/peek.lua",
        "local out = {1, primary and primary.reserved or 0,",
        "local out = {1, 0,",
    ),
    # -- the services -----------------------------------------------------------------------
    Mutation(
        "services: a reused reservation id is a 429 instead of an error",
        "quotas/engine/reservations.py",
        "    if decision.status is DecisionStatus.DUPLICATE_ID:\n",
        "    if False:\n",
    ),
    Mutation(
        "services: a repeated settle sends its ledger record and signal again",
        "quotas/engine/settlement.py",
        "    if outcome.settled_now:\n        send_to_ledger(",
        "    if True:\n        send_to_ledger(",
    ),
    Mutation(
        "services: a degraded request settled without figures loses its ledger row",
        "quotas/engine/settlement.py",
        "actual = reservation.estimated_tokens if actual is None else actual",
        "actual = actual",
    ),
    Mutation(
        "rebuild: the oldest live bucket is left out of a rebuilt window",
        "quotas/engine/seeding.py",
        "        since = at_ms - window.window_ms - window.bucket_ms",
        "        since = at_ms - window.window_ms",
    ),
    Mutation(
        "rebuild: no audit is scheduled for usage still in flight",
        "quotas/engine/seeding.py",
        "        dispatch.send(dispatch.AUDIT_WINDOW, scope, countdown=countdown)",
        "        pass",
    ),
    Mutation(
        "store: a timed-out script call is sent again (it may already have run)",
        "quotas/backends/scripts.py",
        "            except RedisConnectionError:\n                if not reused:",
        "            except (RedisConnectionError, TimeoutError, __import__('redis').TimeoutError):"
        "\n                if not reused:",
    ),
    Mutation(
        "breaker: a probe that fails late does not restart the wait (the next probe is early)",
        "quotas/core/breaker.py",
        "                self._opened_at = self.clock()\n"
        "                if self.state is not BreakerState.OPEN:",
        "                if self.state is BreakerState.CLOSED:\n"
        "                    self._opened_at = self.clock()\n"
        "                if self.state is not BreakerState.OPEN:",
    ),
    Mutation(
        "breaker: opens one failure late",
        "quotas/core/breaker.py",
        "self._count >= self.failures:",
        "self._count > self.failures:",
    ),
    Mutation(
        "breaker: a success does not reset the failure count",
        "quotas/core/breaker.py",
        "            self._count = 0\n",
        "",
    ),
    # -- the ledger and the audit -----------------------------------------------------------
    Mutation(
        "ledger: a row's time is its settle, not its reservation (wrong bucket on rebuild)",
        "quotas/engine/rows.py",
        "created_at=_moment(entry.reserved_at_ms),",
        "created_at=_moment(settled_at),",
    ),
    Mutation(
        "ledger: the sweep drops outbox records before their rows are written",
        "quotas/engine/reconcile.py",
        (
            "        created += write_scope_rows(scope, entries, store)\n"
            "        # Only after the rows are committed: a crash before this line leaves the records in\n"
            "        # the outbox, and the next sweep finds their rows already written. Acknowledging\n"
            "        # nothing still drops an empty outbox from the backlog registry.\n"
            "        store.ack_outbox(scope, [entry.reservation_id for entry in entries])\n"
        ),
        (
            "        store.ack_outbox(scope, [entry.reservation_id for entry in entries])\n"
            "        created += write_scope_rows(scope, entries, store)\n"
        ),
    ),
    Mutation(
        "audit: young buckets are lowered while their rows may still be in the task queue",
        "quotas/engine/reconcile.py",
        "elif want < seen and bucket < settled_before:",
        "elif want < seen:",
    ),
    Mutation(
        "audit: raises may take the window above the ledger's total",
        "quotas/engine/reconcile.py",
        "return lowers + _capped(raises, young_excess)",
        "return lowers + raises",
    ),
    # -- HTTP -------------------------------------------------------------------------------
    Mutation(
        "Retry-After: rounded down (a client that obeys it comes back early)",
        "quotas/core/types.py",
        "return max(math.ceil(seconds - 1e-9), 0)",
        "return max(int(seconds), 0)",
    ),
    Mutation(
        "middleware: a 4xx answered after the reservation is charged, not refunded",
        "quotas/middleware.py",
        "failed = response.status_code >= 400",
        "failed = response.status_code >= 500",
    ),
    Mutation(
        "stream meter: an event split across two chunks is lost",
        "quotas/streaming.py",
        'lines = (self._partial + chunk).split(b"\\n")',
        'lines = chunk.split(b"\\n")',
    ),
    Mutation(
        "stream meter: negative usage figures are believed",
        "quotas/streaming.py",
        "        and 0 <= usage[name] <= MAX_TOKENS\n",
        "        and usage[name] <= MAX_TOKENS\n",
    ),
    # -- layered limits -----------------------------------------------------------------------
    Mutation(
        "settle: a cost limit keeps the estimated cost (never corrected to the real one)",
        f"{LUA}/settle.lua",
        "    delta = actual_cost - cost_est",
        "    delta = 0",
    ),
    Mutation(
        "counters: a team's pooled budget is counted per member",
        "quotas/engine/counters.py",
        "        return config.team.tag",
        "        return scope",
    ),
    Mutation(
        "pricing: a model the price table does not list is free",
        "quotas/core/pricing.py",
        "found = (price, True) if price else (self.conservative(), False)",
        "found = (price, True) if price else (Price('', 0, 0), False)",
    ),
    Mutation(
        "calendar: a month opened without a charge keeps the TTL of the month before",
        f"{LUA}/_window.lua",
        "  w.expiring = tonumber(vals[4]) == start",
        "  w.expiring = tonumber(vals[2]) == start",
        ("tests/core/test_layers_store.py",),
    ),
    Mutation(
        "calendar: a month resets a period late (the client's period is trusted)",
        f"{LUA}/_window.lua",
        "  if now < b2 then start, stop = b1, b2 elseif now >= b3 then start, stop = b3, b4 end",
        "",
    ),
]
