"""The Redis store of the sliding windows. Framework-free: give it a ``redis.Redis`` client.

Every operation is one Lua script, one round trip, atomic. Every Redis error is raised as
``quotas.exceptions.StoreUnavailable``, so the failure policy is decided in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import RedisError

from quotas.backends.outbox import LedgerOutbox
from quotas.backends.records import LedgerEntry, WindowContents, as_text, parse_pending
from quotas.backends.scripts import ScriptRunner
from quotas.core.decisions import Counter, Decision, Peek, SettleOutcome, counter_args, flat_seeds
from quotas.core.types import WindowSpec
from quotas.exceptions import StoreUnavailable

__all__ = ["LedgerEntry", "RedisWindowStore", "ScriptRunner", "WindowContents"]

T = TypeVar("T")
KEY_SUFFIXES = ("w", "q", "p", "r", "x")
SETTLE_FIGURES = frozenset(
    (
        "actual_cost",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "estimate",
        "estimated_cost",
        "reserved_at_ms",
        "model",
        "team",
        "primary",
    )
)


class RedisWindowStore(LedgerOutbox):
    """Sliding-window token and request budgets, one hash of buckets per quota key."""

    # reserve.lua's mode for a decision that records its reservation (see the script).
    RECORD_MODE = "r"

    def __init__(self, client: Redis, *, prefix: str, spec: WindowSpec) -> None:
        self.client = client
        self.prefix = prefix
        self.spec = spec
        self.scripts = ScriptRunner(client)
        self._counter_keys: dict[tuple[str, str], str] = {}
        self._scope_keys: dict[str, list[str]] = {}

    # -- keys ----------------------------------------------------------------------------
    def keys(self, scope: str) -> list[str]:
        """All keys of one quota key; the ``{hash tag}`` keeps them in one cluster slot."""
        return [f"{self.prefix}:{{{scope}}}:{suffix}" for suffix in KEY_SUFFIXES]

    def scope_of(self, key: bytes | str, suffix: str) -> str:
        """The quota key of one of its Redis keys (``<prefix>:{<scope>}:<suffix>``)."""
        return as_text(key)[len(self.prefix) + 2 : -(len(suffix) + 2)]

    def breaker_key(self, scope: str) -> str:
        """Which circuit breaker guards ``scope``'s calls: one Redis, one breaker ("")."""
        return ""

    def _common(self, now_ms: int | None) -> list[Any]:
        spec = self.spec
        override = "" if now_ms is None else str(int(now_ms))
        return [override, spec.window_ms, spec.bucket_ms, spec.rpm_window_ms, spec.rpm_bucket_ms]

    def _run(
        self,
        name: str,
        scope: str,
        args: Sequence[Any],
        now_ms: int | None,
        extra_keys: Sequence[str] = (),
    ) -> Any:
        keys = [*self.keys(scope), *extra_keys]
        return self.scripts.run(name, keys, [*self._common(now_ms), *args])

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # -- decisions -----------------------------------------------------------------------
    def counter_key(self, tag: str, name: str) -> str:
        """The hash of one limit's counter; ``tag`` (the user's quota key, ``t:<team id>`` or
        ``g``) keeps every counter of one scope in one cluster slot."""
        return f"{self.prefix}:{{{tag}}}:{name}"

    def _decision_keys(self, scope: str) -> list[str]:
        """The reserve script's first five keys for ``scope`` (remembered, as counter keys)."""
        keys = self._scope_keys.get(scope)
        if keys is None:
            if len(self._scope_keys) > 100_000:
                self._scope_keys.clear()
            own = self.keys(scope)
            keys = [
                own[2],
                own[3],
                self.attempts_key(scope),
                self.due_key_for(scope),
                self.version_key_for(scope),
            ]
            self._scope_keys[scope] = keys
        return keys

    def counter_keys(self, counters: Sequence[Counter]) -> list[str]:
        """The keys of these counters (remembered: every request names the same few)."""
        known = self._counter_keys
        keys = []
        for counter in counters:
            key = known.get((counter.tag, counter.limit.key))
            if key is None:
                if len(known) > 100_000:
                    known.clear()
                key = known[(counter.tag, counter.limit.key)] = self.counter_key(
                    counter.tag, counter.limit.key
                )
            keys.append(key)
        return keys

    @property
    def version_key(self) -> str:
        """The config version: bumped when a plan, limit, team, quota or price changes, so
        every process drops the limits it holds in memory (see ``reserve``)."""
        return f"{self.prefix}:config:version"

    def version_key_for(self, scope: str) -> str:
        """The config version key the reserve script of ``scope`` reads (one per prefix
        here; one copy per cluster slot on Redis Cluster)."""
        return self.version_key

    def reserve(
        self,
        scope: str,
        reservation_id: str,
        counters: Sequence[Counter],
        amounts: Sequence[int],
        *,
        ttl_ms: int,
        version: str = "",
        concurrency: int = 0,
        attempts_limit: int = 0,
        primary: int = 0,
        tokens: int = 0,
        cost: int = 0,
        team: str = "",
        names: str = "",
        model: str = "",
        seeds: Mapping[int, tuple[str, Sequence[tuple[int, int]]]] | None = None,
        record: bool = True,
        now_ms: int | None = None,
        client_ms: int | None = None,
    ) -> Decision:
        """Charge every counter its amount (``amounts``, in order) if each has room (and the
        concurrency and rejected-attempts limits allow), else charge nothing; one round trip,
        atomic.

        ``version`` (when given) must be the current config version, else nothing is decided
        (``STALE_CONFIG``, with the version). A counter Redis lost or never had is not
        decided either (``NEEDS_SEED``, with its 1-based index) until ``seeds`` gives its
        ledger figures and a new epoch. ``record=False`` only charges the counters (another
        Redis Cluster slot's share of a decision). ``primary`` is the 1-based index of the
        user's primary counter (it keeps the tokens reserved); ``tokens``, ``cost``,
        ``team``, ``names`` (the counters' names) and ``model`` go into the reservation
        record that settle reads. ``client_ms`` is this app server's clock for the calendar
        boundaries it sends (default: ``now_ms``, else the local clock); Redis's clock picks
        among them (tests give a skewed one).
        """
        at = _clock(now_ms if client_ms is None else client_ms)
        spec = self.spec
        keys = [*self._decision_keys(scope), *self.counter_keys(counters)]
        args = [
            "" if now_ms is None else str(int(now_ms)),
            self.RECORD_MODE if record else "c",
            version,
            reservation_id,
            int(ttl_ms),
            int(concurrency),
            int(attempts_limit),
            spec.rpm_window_ms,
            spec.rpm_bucket_ms,
            int(primary),
            int(tokens),
            int(cost),
            team,
            names,
            model,
            len(counters),
            *counter_args(counters, at, amounts),
            *flat_seeds(seeds or {}),
        ]
        return Decision.from_script(self.scripts.run("reserve", keys, args))

    def peek(
        self,
        scope: str,
        counters: Sequence[Counter],
        *,
        primary: int = 0,
        seeds: Mapping[int, tuple[str, Sequence[tuple[int, int]]]] | None = None,
        now_ms: int | None = None,
    ) -> Peek:
        """Every counter's figures, charging nothing (or the counters to seed first)."""
        keys = [self.keys(scope)[2], *self.counter_keys(counters)]
        args = [
            "" if now_ms is None else str(int(now_ms)),
            int(primary),
            len(counters),
            *counter_args(counters, _clock(now_ms), [0] * len(counters)),
            *flat_seeds(seeds or {}),
        ]
        return Peek.from_script(self.scripts.run("peek", keys, args))

    @property
    def revision_key(self) -> str:
        """The database's config revision the version was last bumped for (see
        ``quotas.engine.config.publish_config_changes``)."""
        return f"{self.prefix}:config:revision"

    def bump_version(self, revision: int | None = None) -> None:
        """A plan, limit, team, quota or price changed: every process reloads its limits.
        ``revision``: the database's config revision this publishes, noted after the bump
        (a plain write: two bumps racing may note the older one, which costs one more bump
        at the next sweep, never a missed one)."""
        self._new_version()
        if revision is not None:
            self._call(self.client.set, self.revision_key, revision)

    def _new_version(self) -> None:
        # Made first where Redis lost it: a bare INCR would start again at 1, a version
        # processes may already hold limits tagged with.
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.version_key, str(_clock(None)), nx=True)
        pipe.incr(self.version_key)
        self._call(pipe.execute)

    def published_revision(self) -> int:
        """The config revision Redis's version was last bumped for (0: none, or Redis lost it)."""
        raw = self._call(self.client.get, self.revision_key)
        return int(raw) if raw else 0

    def current_version(self) -> str:
        """The config version (made when Redis has none)."""
        self._call(self.client.set, self.version_key, str(_clock(None)), nx=True)
        return as_text(self._call(self.client.get, self.version_key) or "")

    def pending_record(self, scope: str, reservation_id: str) -> dict[str, Any] | None:
        """A pending reservation's record (see ``parse_pending``), or ``None``."""
        raw = self._call(self.client.hget, self.keys(scope)[3], reservation_id)
        return None if raw is None else parse_pending(as_text(raw))

    def attempts_key(self, scope: str) -> str:
        """The window of one quota key's rejected attempts (400s and 413s)."""
        return f"{self.prefix}:{{{scope}}}:a"

    def record_attempt(self, scope: str, limit: int, *, now_ms: int | None = None) -> float:
        """Count one rejected attempt; return the seconds the client is now refused for (0
        while it is under ``limit`` attempts in the request window)."""
        keys = [self.attempts_key(scope), self.keys(scope)[0]]
        args = [*self._common(now_ms), int(limit)]
        _, blocked_ms = self.scripts.run("attempt", keys, args)
        return max(int(blocked_ms), 0) / 1000

    def settle(
        self,
        scope: str,
        reservation_id: str,
        counters: Sequence[Counter],
        *,
        actual_tokens: int | None,
        actual_cost: int | None = None,
        epoch: str,
        status: str = "settled",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        estimate: int = 0,
        estimated_cost: int = 0,
        reserved_at_ms: int = 0,
        model: str = "",
        team: str = "",
        primary: int = 0,
        now_ms: int | None = None,
    ) -> SettleOutcome:
        """Correct every counter by ``actual - estimate`` (tokens, or cost) in the bucket the
        reservation was charged to, and put its ledger record in the outbox, atomically;
        idempotent by id.

        ``actual_tokens=None`` (``actual_cost=None``) keeps the estimate. ``epoch=""``
        (settling by id alone) never charges a reservation Redis no longer knows. The other
        figures are the caller's, recorded when Redis no longer knows the reservation
        (Redis's own figures win when it does).
        """
        keys, args = self._settle_call(
            scope,
            reservation_id,
            counters,
            actual_tokens=actual_tokens,
            actual_cost=actual_cost,
            epoch=epoch,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            estimate=estimate,
            estimated_cost=estimated_cost,
            reserved_at_ms=reserved_at_ms,
            model=model,
            team=team,
            primary=primary,
            now_ms=now_ms,
        )
        return SettleOutcome.from_script(self.scripts.run("settle", keys, args))

    def settle_many(
        self, settles: Sequence[dict[str, Any]]
    ) -> list[SettleOutcome | StoreUnavailable]:
        """Several settles in one round trip: each dict holds ``settle``'s arguments by name.

        Each settle is atomic and idempotent on its own, as ``settle`` is; one whose script
        failed gets a ``StoreUnavailable`` in its place. ``StoreUnavailable`` is raised when
        Redis cannot be reached (none, some or all may then have been applied: settling again
        is safe).
        """
        replies = self.scripts.run_many("settle", [self._settle_call(**s) for s in settles])
        return [
            StoreUnavailable(f"Redis error: {reply}")
            if isinstance(reply, Exception)
            else SettleOutcome.from_script(reply)
            for reply in replies
        ]

    def _settle_call(
        self,
        scope: str,
        reservation_id: str,
        counters: Sequence[Counter],
        *,
        actual_tokens: int | None,
        epoch: str,
        now_ms: int | None = None,
        **figures: Any,
    ) -> tuple[list[str], list[Any]]:
        """Keys and arguments of one settle script call (``figures``: ``settle``'s other
        keyword arguments)."""
        unknown = set(figures) - SETTLE_FIGURES
        if unknown:
            raise TypeError(f"Unknown settle arguments: {sorted(unknown)}")
        get = figures.get
        prompt, completion, cost = (
            get("prompt_tokens"),
            get("completion_tokens"),
            get("actual_cost"),
        )
        keys = [
            *self.keys(scope)[2:5],
            f"{self.prefix}:{{{scope}}}:s:{reservation_id}",
            self.backlog_key_for(scope),
            *self.counter_keys(counters),
        ]
        args = [
            "" if now_ms is None else str(int(now_ms)),
            reservation_id,
            -1 if actual_tokens is None else int(actual_tokens),
            -1 if cost is None else int(cost),
            epoch,
            get("status", "settled"),
            "" if prompt is None else int(prompt),
            "" if completion is None else int(completion),
            int(get("estimate", 0)),
            int(get("reserved_at_ms", 0)),
            get("model", ""),
            int(get("estimated_cost", 0)),
            get("team", ""),
            int(get("primary", 0)),
            len(counters),
            *counter_args(counters, _clock(now_ms)),
        ]
        return keys, args

    def expire(self, scope: str, *, batch: int = 500, now_ms: int | None = None) -> int:
        """Move up to ``batch`` reservations past their deadline to the outbox; return how many
        overdue ids it took (``batch``: call again, there may be more)."""
        keys = [self.backlog_key_for(scope), self.due_key_for(scope)]
        return int(self._run("expire", scope, [batch], now_ms, extra_keys=keys))

    def window_contents(self, scope: str, *, now_ms: int | None = None) -> WindowContents:
        """The live buckets, pending reservations and outbox of one quota key, read at once."""
        raw = self._run("buckets", scope, [], now_ms)
        return WindowContents(
            epoch=as_text(raw[0]),
            now_ms=int(raw[1]),
            first_bucket=int(raw[2]),
            current_bucket=int(raw[3]),
            buckets={int(b): int(v) for b, v in zip(raw[4][::2], raw[4][1::2], strict=True)},
            pending=self._held(raw[5]),
            outbox=[
                LedgerEntry.parse(scope, rid, rec)
                for rid, rec in zip(raw[6][::2], raw[6][1::2], strict=True)
            ],
            reset_ms=int(raw[7]),
        )

    def repair_buckets(
        self,
        scope: str,
        epoch: str,
        changes: Sequence[tuple[int, int, int]],
        *,
        now_ms: int | None = None,
    ) -> int | None:
        """Set buckets to new figures: ``(bucket, tokens read, tokens to set)`` triples.

        A bucket changes only if it still holds the tokens read, and only in ``epoch``.
        Returns the tokens added (negative: removed), or ``None`` when the window was rebuilt
        or lost since it was read.
        """
        flat = [int(value) for change in changes for value in change]
        delta, changed = self._run("audit", scope, [epoch, *flat], now_ms)
        return None if int(changed) < 0 else int(delta)

    def reset(self, scope: str, counters: Sequence[Counter]) -> None:
        """Give the user's whole budget back now in these counters (the primary first), and
        forget their rejected attempts; keeps the epochs (nothing is rebuilt)."""
        keys = [self.attempts_key(scope), *self.counter_keys(counters)]
        self.scripts.run("reset", keys, [""])

    def memory_usage(self, scope: str, counters: Sequence[Counter] = ()) -> int:
        """Bytes Redis uses for every key of one quota key, and these counters of its
        (``MEMORY USAGE``)."""
        total = 0
        for key in dict.fromkeys([*self.keys(scope), *self.counter_keys(counters)]):
            total += self._call(self.client.memory_usage, key, samples=0) or 0
        return total

    @staticmethod
    def _held(flat: Sequence[bytes | str]) -> dict[str, tuple[int, int]]:
        held = {}
        for rid, rec in zip(flat[::2], flat[1::2], strict=True):
            record = parse_pending(as_text(rec))
            held[as_text(rid)] = (record["bucket"], record["tokens"])
        return held


def _clock(now_ms: int | None) -> int:
    """The client's clock (ms), for the calendar boundaries it sends: Redis's own clock picks
    among them, so this one only needs to be within a period of it."""
    return int(time.time() * 1000) if now_ms is None else int(now_ms)
