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
        "reserve: a request that exactly fills the budget is refused",
        f"{LUA}/reserve.lua",
        "if w.total + tokens > cfg.tokens then",
        "if w.total + tokens >= cfg.tokens then",
    ),
    Mutation(
        "reserve: a reused reservation id is charged again",
        f"{LUA}/reserve.lua",
        "redis.call('HSETNX', KEYS[4], rid, record) == 0",
        "redis.call('HSET', KEYS[4], rid, record) < 0",
    ),
    Mutation(
        "reserve: a refused request is charged",
        f"{LUA}/reserve.lua",
        "if status == 1 then\n  reserved = reserved + tokens",
        "if status ~= 6 then\n  reserved = reserved + tokens",
    ),
    Mutation(
        "reserve: one request more than the concurrency limit is let in",
        f"{LUA}/reserve.lua",
        "'+inf') >= cfg.conc then",
        "'+inf') > cfg.conc then",
    ),
    Mutation(
        "reserve: one request more than the requests-per-minute limit is let in",
        f"{LUA}/reserve.lua",
        "if q and q.total + 1 > cfg.rpm then",
        "if q and q.total > cfg.rpm then",
    ),
    Mutation(
        "reserve: a request exactly at the per-request cap is a 413",
        f"{LUA}/reserve.lua",
        "if cfg.cap > 0 and tokens > cfg.cap then",
        "if cfg.cap > 0 and tokens >= cfg.cap then",
    ),
    Mutation(
        "reserve: the plan's default output allowance is not added",
        f"{LUA}/reserve.lua",
        "if ARGV[12] == '1' then tokens = tokens + cfg.out end",
        "if ARGV[12] == '1' then tokens = tokens end",
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
        f"{LUA}/settle.lua",
        "local field = slot(w.nb, bucket)",
        "local field = slot(w.nb, w.cur)",
    ),
    Mutation(
        "settle: a refund to the oldest live bucket is dropped",
        f"{LUA}/settle.lua",
        "if bucket >= w.first then",
        "if bucket > w.first then",
    ),
    Mutation(
        "settle: a bucket may go negative (a refund after an admin reset gives extra budget)",
        f"{LUA}/settle.lua",
        "local after = math.max(before + actual - estimate, 0)",
        "local after = before + actual - estimate",
    ),
    Mutation(
        "settle: the reserved figure is never released",
        f"{LUA}/settle.lua",
        "'rv', math.max(w.reserved - estimate, 0))",
        "'rv', w.reserved)",
    ),
    Mutation(
        "settle: the concurrency slot is never released",
        f"{LUA}/settle.lua",
        "redis.call('HDEL', KEYS[4], rid)\nredis.call('ZREM', KEYS[3], rid)\n",
        "redis.call('HDEL', KEYS[4], rid)\n",
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
        "if redis.call('SET', KEYS[6], 1, 'NX', 'PX', w.ttl) then",
        "if true then",
    ),
    Mutation(
        "settle: a degraded request settled before its window is rebuilt loses its ledger row",
        f"{LUA}/settle.lua",
        "        status = 3\n",
        "        status = 0\n",
    ),
    Mutation(
        "settle: a degraded request whose reserve did reach Redis is charged again on a repeat",
        f"{LUA}/settle.lua",
        "  redis.call('SET', KEYS[6], 1, 'PX', w.ttl)\n",
        "",
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
        "return {1, cfg.tokens, w.total, w.reserved, cfg.tokens - w.total,",
        "return {1, cfg.tokens, w.total, w.reserved, cfg.tokens - w.total + w.reserved,",
    ),
    # -- the services -----------------------------------------------------------------------
    Mutation(
        "services: a reused reservation id is a 429 instead of an error",
        "quotas/services.py",
        "    if result.status is ReserveStatus.DUPLICATE_ID:\n"
        '        raise ValueError(f"Reservation {rid!r} already exists: request ids must be '
        'unique.")\n',
        "",
    ),
    Mutation(
        "services: a repeated settle sends its ledger record and signal again",
        "quotas/services.py",
        "    if outcome.settled_now:\n        send_to_ledger(",
        "    if True:\n        send_to_ledger(",
    ),
    Mutation(
        "services: a degraded request settled without figures loses its ledger row",
        "quotas/services.py",
        "actual = reservation.estimated_tokens if actual is None else actual",
        "actual = actual",
    ),
    Mutation(
        "services: the per-request cap is not enforced while Redis is down",
        "quotas/services.py",
        "    if cap and tokens > cap:\n        raise RequestTooLarge(",
        "    if False:\n        raise RequestTooLarge(",
    ),
    Mutation(
        "rebuild: the oldest live bucket is left out of a rebuilt window",
        "quotas/services.py",
        "(now_ms - spec.window_ms - spec.bucket_ms) / 1000",
        "(now_ms - spec.window_ms) / 1000",
    ),
    Mutation(
        "rebuild: no audit is scheduled for usage still in flight",
        "quotas/services.py",
        "        audit_window_task.apply_async(args=[scope], countdown=countdown, retry=False)",
        "        pass",
    ),
    Mutation(
        "store: a timed-out script call is sent again (it may already have run)",
        "quotas/backends/redis.py",
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
        "quotas/ledger.py",
        "created_at=_moment(entry.reserved_at_ms),",
        "created_at=_moment(settled_at),",
    ),
    Mutation(
        "ledger: the sweep drops outbox records before their rows are written",
        "quotas/ledger.py",
        "        created += _write_rows(scope, entries)\n"
        "        # Only after the rows are committed: a crash before this line leaves the "
        "records in\n"
        "        # the outbox, and the next sweep finds their rows already written.\n"
        "        store.ack_outbox(scope, [entry.reservation_id for entry in entries])\n",
        "        store.ack_outbox(scope, [entry.reservation_id for entry in entries])\n"
        "        created += _write_rows(scope, entries)\n",
    ),
    Mutation(
        "audit: young buckets are lowered while their rows may still be in the task queue",
        "quotas/ledger.py",
        "elif want < seen and bucket < settled_before:",
        "elif want < seen:",
    ),
    Mutation(
        "audit: raises may take the window above the ledger's total",
        "quotas/ledger.py",
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
        "quotas/middleware.py",
        'lines = (self._partial + chunk).split(b"\\n")',
        'lines = chunk.split(b"\\n")',
    ),
    Mutation(
        "stream meter: negative usage figures are believed",
        "quotas/middleware.py",
        "        and usage[name] >= 0\n",
        "",
    ),
]
