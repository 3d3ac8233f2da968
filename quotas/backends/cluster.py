"""The window store on Redis Cluster. Framework-free: give it a ``redis.cluster.RedisCluster``.

A script reaches the keys of one hash slot only, so on a cluster:

- the registries the scripts keep (the ledger backlog, the due reservations) and the config
  version exist once per hash slot (under a hash tag chosen to land in that slot), and a set
  of the slots in use (``<prefix>:ledger:slots``) lets the ledger sweep and ``bump_version``
  reach every copy without ``SCAN``;
- a decision whose layers live in several slots (the user's counters under the user's tag,
  a team's under ``t:<id>``, global ones under ``g``) is one reserve per slot: the other
  slots' layers are checked and charged first (each atomically), the user's share (which
  records the reservation) last; a refusal in any slot gives back what the others took
  (``correct.lua``). No slot ever admits past its budget, so nothing overshoots; while a
  refused request's charge is being given back, a concurrent request of the same team or
  global layer can be refused for room it would have had (a conservative error, never an
  admission). The exact Retry-After of a refusal is the longest wait among every slot's
  refusing layers, as on one Redis;
- a settle corrects the user's slot first (atomic and idempotent, as on one Redis) and then
  the other slots' layers by the same difference. A process that dies between the two
  leaves the other slots at the estimate until it ages out of their windows.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cache
from typing import Any, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from quotas.backends.redis import RedisWindowStore
from quotas.backends.scripts import ScriptRunner
from quotas.core.decisions import (
    Counter,
    Decision,
    DecisionStatus,
    Figure,
    Peek,
    SettleOutcome,
    counter_args,
    figures,
)
from quotas.exceptions import StoreUnavailable

__all__ = ["ClusterWindowStore", "hash_slot", "slot_tag"]

T = TypeVar("T")
SLOTS = 16384
CLUSTER_ERRORS = (RedisError, RedisClusterException, OSError)


def hash_slot(tag: str) -> int:
    """The Redis Cluster hash slot of the keys under the hash tag ``{tag}``."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@cache
def _slot_tags() -> tuple[str, ...]:
    """For every hash slot, a short hash tag whose keys land in it (made once per process)."""
    tags: list[str] = [""] * SLOTS
    left, i = SLOTS, 0
    while left:
        tag = f"@{i:x}"
        slot = hash_slot(tag)
        if not tags[slot]:
            tags[slot] = tag
            left -= 1
        i += 1
    return tuple(tags)


def slot_tag(slot: int) -> str:
    """A hash tag whose keys live in ``slot``."""
    return _slot_tags()[slot]


class ClusterScripts(ScriptRunner):
    """Scripts through redis-py's cluster client (it routes each call to its slot's node),
    every cluster error raised as ``StoreUnavailable``."""

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return self._run_with_client(name, keys, args)
        except CLUSTER_ERRORS as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def run_many(self, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list:
        return [self.run(name, keys, args) for keys, args in calls]


class ClusterWindowStore(RedisWindowStore):
    """``RedisWindowStore`` on Redis Cluster (see the module docstring)."""

    RECORD_MODE = "R"
    client: Any  # a redis.cluster.RedisCluster

    def __init__(self, client: Any, *, prefix: str, spec: Any) -> None:
        super().__init__(client, prefix=prefix, spec=spec)
        self.scripts = ClusterScripts(client)
        self._slots_known: set[int] = set()

    # -- keys ----------------------------------------------------------------------------
    def slot_of(self, scope: str) -> int:
        return hash_slot(scope)

    def _slot_key(self, scope: str, name: str) -> str:
        return f"{self.prefix}:{{{slot_tag(self.slot_of(scope))}}}:{name}"

    def version_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "config:version")

    def backlog_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "ledger:backlog")

    def due_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "ledger:due")

    @property
    def slots_key(self) -> str:
        """The set of hash slots whose registries and version copy may exist."""
        return f"{self.prefix}:ledger:slots"

    def breaker_key(self, scope: str) -> str:
        """The node serving ``scope``'s slot: a failing node opens its own breaker only."""
        try:
            node = self.client.nodes_manager.get_node_from_slot(self.slot_of(scope))
        except CLUSTER_ERRORS:
            return "?"
        return str(node.name)

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CLUSTER_ERRORS as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # -- slots in use and the config version ---------------------------------------------
    def _know_slot(self, scope: str, *, again: bool = False) -> None:
        """Note ``scope``'s slot in the slot set and give it the version copy (once per
        process and slot, before its first script: the sweep and ``bump_version`` then
        reach it)."""
        slot = self.slot_of(scope)
        if slot in self._slots_known and not again:
            return
        self._call(self.client.sadd, self.slots_key, slot)
        version = self.current_version()
        self._call(self.client.set, self.version_key_for(scope), version, nx=True)
        self._slots_known.add(slot)

    def _used_slots(self) -> list[int]:
        raw = self._call(self.client.smembers, self.slots_key)
        return sorted(int(slot) for slot in raw)

    def bump_version(self) -> None:
        """A limit changed: a new version, written to every slot's copy."""
        version = self._call(self.client.incr, self.version_key)
        self._write_version(str(version))

    def current_version(self) -> str:
        """The config version (made, and copied to every slot in use, when Redis has none)."""
        made = self._call(self.client.set, self.version_key, str(_now_ms()), nx=True)
        version = _text(self._call(self.client.get, self.version_key) or "")
        if made:
            self._write_version(version)
        return version

    def _write_version(self, version: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for slot in self._used_slots():
            pipe.set(f"{self.prefix}:{{{slot_tag(slot)}}}:config:version", version)
        self._call(pipe.execute)

    # -- decisions -----------------------------------------------------------------------
    def _shares(self, scope: str, counters: Sequence[Counter]) -> tuple[list[int], list[list[int]]]:
        """The 0-based indices of the counters in ``scope``'s slot, and of the others by slot."""
        own_slot = self.slot_of(scope)
        own: list[int] = []
        others: dict[int, list[int]] = {}
        for i, counter in enumerate(counters):
            slot = self.slot_of(counter.tag)
            if slot == own_slot:
                own.append(i)
            else:
                others.setdefault(slot, []).append(i)
        return own, [others[slot] for slot in sorted(others)]

    def reserve(  # type: ignore[override]
        self,
        scope: str,
        reservation_id: str,
        counters: Sequence[Counter],
        amounts: Sequence[int],
        *,
        seeds: Mapping[int, tuple[str, Sequence[tuple[int, int]]]] | None = None,
        primary: int = 0,
        version: str = "",
        now_ms: int | None = None,
        **options: Any,
    ) -> Decision:
        """``RedisWindowStore.reserve``, one script per slot (see the module docstring)."""
        self._know_slot(scope)
        own, others = self._shares(scope, counters)
        seeds = seeds or {}
        taken: list[tuple[list[int], Decision]] = []
        for share in others:
            decision = self._share(reservation_id, share, counters, amounts, seeds, now_ms, options)
            if decision.status is not DecisionStatus.ALLOWED:
                return self._refused(scope, counters, amounts, taken, share, decision, now_ms)
            taken.append((share, decision))
        try:
            mine = self._own_share(
                scope,
                reservation_id,
                own,
                counters,
                amounts,
                seeds,
                primary,
                version,
                now_ms,
                options,
            )
        except StoreUnavailable:
            self._give_back(counters, amounts, taken, now_ms)
            raise
        if mine.status is not DecisionStatus.ALLOWED:
            return self._refused(scope, counters, amounts, taken, own, mine, now_ms)
        return self._merged(mine, own, taken, len(counters))

    def _own_share(
        self,
        scope: str,
        rid: str,
        own: list[int],
        counters: Sequence[Counter],
        amounts: Sequence[int],
        seeds: Mapping[int, Any],
        primary: int,
        version: str,
        now_ms: int | None,
        options: dict[str, Any],
    ) -> Decision:
        """The user's share: records the reservation (and checks the config version)."""
        local_primary = own.index(primary - 1) + 1 if primary and (primary - 1) in own else 0
        for attempt in range(2):
            decision = super().reserve(
                scope,
                rid,
                [counters[i] for i in own],
                [amounts[i] for i in own],
                seeds=_local_seeds(seeds, own),
                primary=local_primary,
                version=version,
                now_ms=now_ms,
                **options,
            )
            lost_copy = decision.status is DecisionStatus.STALE_CONFIG and not decision.version
            if not lost_copy or attempt:
                return decision
            self._know_slot(scope, again=True)  # the node lost its copy of the version
        return decision

    def _share(
        self,
        rid: str,
        share: list[int],
        counters: Sequence[Counter],
        amounts: Sequence[int],
        seeds: Mapping[int, Any],
        now_ms: int | None,
        options: dict[str, Any],
    ) -> Decision:
        """Check and charge one other slot's layers (nothing recorded there)."""
        tag = counters[share[0]].tag
        return RedisWindowStore.reserve(
            self,
            tag,
            rid,
            [counters[i] for i in share],
            [amounts[i] for i in share],
            seeds=_local_seeds(seeds, share),
            record=False,
            now_ms=now_ms,
            client_ms=options.get("client_ms"),
            ttl_ms=options.get("ttl_ms", 0),
        )

    def _give_back(
        self,
        counters: Sequence[Counter],
        amounts: Sequence[int],
        taken: list[tuple[list[int], Decision]],
        now_ms: int | None,
    ) -> None:
        """Release what the slots in ``taken`` charged (best effort: a slot that cannot be
        reached keeps the charge until it ages out, which never lets anything through)."""
        for share, decision in taken:
            try:
                self.correct(
                    [counters[i] for i in share],
                    [-amounts[i] for i in share],
                    at_ms=decision.now_ms,
                    now_ms=now_ms,
                )
            except StoreUnavailable:
                continue

    def _refused(
        self,
        scope: str,
        counters: Sequence[Counter],
        amounts: Sequence[int],
        taken: list[tuple[list[int], Decision]],
        share: list[int],
        decision: Decision,
        now_ms: int | None,
    ) -> Decision:
        """A refusal (or a status the caller must act on) from one slot: give back what the
        others took, and answer for the whole decision."""
        self._give_back(counters, amounts, taken, now_ms)
        if decision.status is DecisionStatus.STALE_CONFIG:
            return decision
        if decision.status is DecisionStatus.NEEDS_SEED:
            return replace(decision, unbuilt=self._unbuilt(scope, counters, share, decision))
        if decision.status is DecisionStatus.DUPLICATE_ID:
            return decision
        return self._refusal(scope, counters, amounts, taken, share, decision, now_ms)

    def _unbuilt(
        self, scope: str, counters: Sequence[Counter], share: list[int], decision: Decision
    ) -> tuple[int, ...]:
        """Every counter to seed, in every slot (one seed round for the caller)."""
        unbuilt = {share[i - 1] + 1 for i in decision.unbuilt}
        own, others = self._shares(scope, counters)
        for group in [own, *others]:
            if not group or group == share:
                continue
            peek = self._peek_group(scope, counters, group, 0, {}, None)
            unbuilt |= {group[i - 1] + 1 for i in peek.unbuilt}
        return tuple(sorted(unbuilt))

    def _refusal(
        self,
        scope: str,
        counters: Sequence[Counter],
        amounts: Sequence[int],
        taken: list[tuple[list[int], Decision]],
        share: list[int],
        decision: Decision,
        now_ms: int | None,
    ) -> Decision:
        """The refusal with every layer's figures, and the longest wait among every slot's
        refusing layers (the other slots are asked too: nothing stays charged)."""
        figs: list[Figure | None] = [None] * len(counters)
        for group, done in taken:
            for i, fig in zip(group, done.figures, strict=True):
                figs[i] = Figure(max(fig.total - amounts[i], 0), fig.reset_ms)
        _place(figs, share, decision.figures)
        status, refusing, retry = decision.status, _global(share, decision.refusing), 0
        retry = decision.retry_ms
        own, others = self._shares(scope, counters)
        for group in [*others, own]:
            if not group or any(figs[i] is not None for i in group):
                continue
            probe = self._share("", group, counters, amounts, {}, now_ms, {})
            if probe.status is DecisionStatus.ALLOWED:
                self._give_back(counters, amounts, [(group, probe)], now_ms)
                _place(
                    figs,
                    group,
                    [
                        Figure(max(f.total - amounts[i], 0), f.reset_ms)
                        for i, f in zip(group, probe.figures, strict=True)
                    ],
                )
            elif probe.status is DecisionStatus.OVER_LIMIT:
                _place(figs, group, probe.figures)
                if probe.retry_ms > retry:
                    refusing, retry = _global(group, probe.refusing), probe.retry_ms
            else:
                _place(figs, group, [Figure(0, 0)] * len(group))
        return replace(
            decision,
            status=status,
            refusing=refusing,
            retry_ms=retry,
            figures=tuple(f or Figure(0, 0) for f in figs),
        )

    def _merged(
        self, mine: Decision, own: list[int], taken: list[tuple[list[int], Decision]], n: int
    ) -> Decision:
        figs: list[Figure | None] = [None] * n
        _place(figs, own, mine.figures)
        for group, decision in taken:
            _place(figs, group, decision.figures)
        return replace(mine, figures=tuple(f or Figure(0, 0) for f in figs))

    def correct(
        self,
        counters: Sequence[Counter],
        deltas: Sequence[int],
        *,
        at_ms: int,
        now_ms: int | None = None,
    ) -> tuple[Figure, ...]:
        """Add ``deltas`` to these counters (all in one slot) in the bucket charged at
        ``at_ms``; their figures after."""
        keys = self.counter_keys(counters)
        args = [
            "" if now_ms is None else str(int(now_ms)),
            int(at_ms),
            len(counters),
            *counter_args(counters, at_ms, deltas),
        ]
        return figures(self.scripts.run("correct", keys, args))

    # -- snapshots -------------------------------------------------------------------------
    def peek(
        self,
        scope: str,
        counters: Sequence[Counter],
        *,
        primary: int = 0,
        seeds: Mapping[int, tuple[str, Sequence[tuple[int, int]]]] | None = None,
        now_ms: int | None = None,
    ) -> Peek:
        own, others = self._shares(scope, counters)
        figs: list[Figure | None] = [None] * len(counters)
        unbuilt: list[int] = []
        result = Peek()
        for group in [own, *others]:
            if not group:
                continue
            peek = self._peek_group(scope, counters, group, primary, seeds or {}, now_ms)
            unbuilt += [group[i - 1] + 1 for i in peek.unbuilt]
            _place(figs, group, peek.figures)
            if group is own:
                result = peek
        if unbuilt:
            return Peek(unbuilt=tuple(sorted(unbuilt)))
        return replace(result, figures=tuple(f or Figure(0, 0) for f in figs))

    def _peek_group(
        self,
        scope: str,
        counters: Sequence[Counter],
        group: list[int],
        primary: int,
        seeds: Mapping[int, Any],
        now_ms: int | None,
    ) -> Peek:
        own_slot = self.slot_of(scope)
        tag = scope if self.slot_of(counters[group[0]].tag) == own_slot else counters[group[0]].tag
        local_primary = group.index(primary - 1) + 1 if primary and (primary - 1) in group else 0
        return RedisWindowStore.peek(
            self,
            tag,
            [counters[i] for i in group],
            primary=local_primary,
            seeds=_local_seeds(seeds, group),
            now_ms=now_ms,
        )

    # -- settles -------------------------------------------------------------------------
    def settle(  # type: ignore[override]
        self,
        scope: str,
        reservation_id: str,
        counters: Sequence[Counter],
        *,
        primary: int = 0,
        now_ms: int | None = None,
        **figures_: Any,
    ) -> SettleOutcome:
        """``RedisWindowStore.settle``: the user's slot first, then the others' layers."""
        self._know_slot(scope)
        own, others = self._shares(scope, counters)
        local_primary = own.index(primary - 1) + 1 if primary and (primary - 1) in own else 0
        outcome = super().settle(
            scope,
            reservation_id,
            [counters[i] for i in own],
            primary=local_primary,
            now_ms=now_ms,
            **figures_,
        )
        figs: list[Figure | None] = [None] * len(counters)
        _place(figs, own, outcome.figures)
        for group in others:
            _place(figs, group, self._settle_other(counters, group, outcome, now_ms))
        return replace(outcome, figures=tuple(f or Figure(0, 0) for f in figs))

    def _settle_other(
        self,
        counters: Sequence[Counter],
        group: list[int],
        outcome: SettleOutcome,
        now_ms: int | None,
    ) -> tuple[Figure, ...]:
        """Apply a settle's correction to one other slot's layers: ``actual - estimate`` in
        the reservation's bucket (status 1), the actual usage now (status 2: the user's
        counters were rebuilt), nothing otherwise (only their figures)."""
        group_counters = [counters[i] for i in group]
        if outcome.status == 1:
            deltas = [
                _units(c, outcome.actual, outcome.cost)
                - _units(c, outcome.estimate, outcome.estimated_cost)
                for c in group_counters
            ]
            at = outcome.reserved_at_ms
        elif outcome.status == 2:
            deltas = [_units(c, outcome.actual, outcome.cost, requests=1) for c in group_counters]
            at = _now_ms() if now_ms is None else now_ms
        else:
            deltas, at = [0] * len(group), _now_ms() if now_ms is None else now_ms
        return self.correct(group_counters, deltas, at_ms=at, now_ms=now_ms)

    def settle_many(
        self, settles: Sequence[dict[str, Any]]
    ) -> list[SettleOutcome | StoreUnavailable]:
        """Each settle on its own (their keys live in different slots)."""
        results: list[SettleOutcome | StoreUnavailable] = []
        for arguments in settles:
            try:
                results.append(self.settle(**arguments))
            except StoreUnavailable as exc:
                results.append(exc)
        return results

    def reset(self, scope: str, counters: Sequence[Counter]) -> None:
        """Only the user's own counters (``scope``'s slot) can be reset at once."""
        own, _ = self._shares(scope, counters)
        super().reset(scope, [counters[i] for i in own])

    def expire(self, scope: str, *, batch: int = 500, now_ms: int | None = None) -> int:
        self._know_slot(scope)
        return super().expire(scope, batch=batch, now_ms=now_ms)

    # -- the registries, per slot ----------------------------------------------------------
    def _each_slot(self, command: str, *args: Any) -> list[tuple[int, Any]]:
        """``command`` on the registry ``<name>`` of every slot in use, in one pipeline."""
        slots = self._used_slots()
        pipe = self.client.pipeline(transaction=False)
        for slot in slots:
            getattr(pipe, command)(*args_for(self.prefix, slot, args))
        replies = self._call(pipe.execute)
        return list(zip(slots, replies, strict=True))

    def backlog(self, *, now_ms: int | None = None) -> tuple[int, float | None]:
        count, since = 0, None
        now = _now_ms() if now_ms is None else now_ms
        pairs = self._each_slot("zrange", "ledger:backlog", 0, 0, "withscores")
        cards = self._each_slot("zcard", "ledger:backlog")
        for (_, first), (_, card) in zip(pairs, cards, strict=True):
            count += int(card)
            if first:
                score = int(first[0][1])
                since = score if since is None else min(since, score)
        waited = None if since is None else max(now - since, 0) / 1000
        return count, waited

    def backlog_scopes(self) -> Iterator[str]:
        for _, members in self._each_slot("zrange", "ledger:backlog", 0, -1):
            for key in members:
                yield self.scope_of(key, "x")

    def due_scopes(self, *, limit: int = 100_000, now_ms: int | None = None) -> list[str]:
        now = self._redis_now() if now_ms is None else now_ms
        scopes: list[str] = []
        for _, keys in self._each_slot("zrangebyscore", "ledger:due", "-inf", now):
            scopes += [self.scope_of(key, "p") for key in keys]
        return scopes[:limit]

    def _redis_now(self) -> int:
        seconds, micros = self._call(self.client.time)
        return int(seconds) * 1000 + int(micros) // 1000


def args_for(prefix: str, slot: int, args: tuple[Any, ...]) -> list[Any]:
    """A per-slot registry command's arguments: its name becomes the slot's key."""
    name, *rest = args
    return [f"{prefix}:{{{slot_tag(slot)}}}:{name}", *rest]


def _local_seeds(seeds: Mapping[int, Any], group: list[int]) -> dict[int, Any]:
    """The seeds of ``group``'s counters, by their 1-based index within the group."""
    return {group.index(i - 1) + 1: seed for i, seed in seeds.items() if (i - 1) in group}


def _place(target: list[Figure | None], group: list[int], values: Sequence[Figure]) -> None:
    for i, value in zip(group, values, strict=True):
        target[i] = value


def _global(group: list[int], local: int) -> int:
    """A 1-based index within ``group`` as a 1-based index among all counters."""
    return group[local - 1] + 1 if local else 0


def _units(counter: Counter, tokens: int, cost: int, *, requests: int = 0) -> int:
    return {"t": tokens, "c": cost, "r": requests}[counter.metric_code]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
