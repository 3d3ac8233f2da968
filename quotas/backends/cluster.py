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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from quotas.backends.cluster_slots import SlottedStore, hash_slot, now_ms_local, slot_tag
from quotas.backends.redis import RedisWindowStore
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


@dataclass
class _Decision:
    """One decision being made slot by slot: its arguments, and the shares taken so far."""

    scope: str
    rid: str
    counters: Sequence[Counter]
    amounts: Sequence[int]
    seeds: Mapping[int, Any]
    now_ms: int | None
    options: dict[str, Any]
    taken: list[tuple[list[int], Decision]] = field(default_factory=list)

    def of(self, group: list[int]) -> tuple[list[Counter], list[int]]:
        return [self.counters[i] for i in group], [self.amounts[i] for i in group]


class ClusterWindowStore(SlottedStore):
    """``RedisWindowStore`` on Redis Cluster (see the module docstring)."""

    RECORD_MODE = "R"

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
        call = _Decision(scope, reservation_id, counters, amounts, seeds or {}, now_ms, options)
        try:
            for share in others:
                decision = self._share(call, share)
                if decision.status is not DecisionStatus.ALLOWED:
                    return self._refused(call, share, decision)
                call.taken.append((share, decision))
                # Every slot charges at the first one's moment: one bucket for the settle.
                call.now_ms = decision.now_ms if now_ms is None else now_ms
            mine = self._own_share(call, own, primary, version)
        except StoreUnavailable:
            self._give_back(call, call.taken)
            raise
        if mine.status is not DecisionStatus.ALLOWED:
            return self._refused(call, own, mine)
        figs = _figures(len(counters), [(own, mine.figures)], call.taken)
        return replace(mine, figures=figs)

    def _own_share(self, call: _Decision, own: list[int], primary: int, version: str) -> Decision:
        """The user's share: records the reservation (and checks the config version)."""
        counters, amounts = call.of(own)
        for attempt in range(2):
            decision = super().reserve(
                call.scope,
                call.rid,
                counters,
                amounts,
                seeds=_local_seeds(call.seeds, own),
                primary=_local(own, primary),
                version=version,
                now_ms=call.now_ms,
                **call.options,
            )
            lost_copy = decision.status is DecisionStatus.STALE_CONFIG and not decision.version
            if not lost_copy or attempt:
                return decision
            self._know_slot(call.scope, again=True)  # the node lost its copy of the version
        return decision

    def _share(self, call: _Decision, share: list[int], *, seeded: bool = True) -> Decision:
        """Check and charge one other slot's layers (nothing recorded there)."""
        counters, amounts = call.of(share)
        return RedisWindowStore.reserve(
            self,
            counters[0].tag,
            call.rid,
            counters,
            amounts,
            seeds=_local_seeds(call.seeds, share) if seeded else {},
            record=False,
            now_ms=call.now_ms,
            client_ms=call.options.get("client_ms"),
            ttl_ms=call.options.get("ttl_ms", 0),
        )

    def _give_back(self, call: _Decision, taken: list[tuple[list[int], Decision]]) -> None:
        """Release what the slots in ``taken`` charged (best effort: a slot that cannot be
        reached keeps the charge until it ages out, which never lets anything through)."""
        for share, decision in taken:
            counters, amounts = call.of(share)
            try:
                self.correct(counters, [-a for a in amounts], at_ms=decision.now_ms)
            except StoreUnavailable:
                continue

    def _refused(self, call: _Decision, share: list[int], decision: Decision) -> Decision:
        """A refusal (or a status the caller must act on) from one slot: give back what the
        others took, and answer for the whole decision."""
        self._give_back(call, call.taken)
        status = decision.status
        if status is DecisionStatus.NEEDS_SEED:
            return replace(decision, unbuilt=self._unbuilt(call, share, decision))
        if status in (DecisionStatus.STALE_CONFIG, DecisionStatus.DUPLICATE_ID):
            return decision
        return self._refusal(call, share, decision)

    def _unbuilt(self, call: _Decision, share: list[int], decision: Decision) -> tuple[int, ...]:
        """Every counter to seed, in every slot (one seed round for the caller)."""
        unbuilt = {share[i - 1] + 1 for i in decision.unbuilt}
        own, others = self._shares(call.scope, call.counters)
        for group in [own, *others]:
            if group and group != share:
                peek = self._peek_group(call.scope, call.counters, group, 0, {}, None)
                unbuilt |= {group[i - 1] + 1 for i in peek.unbuilt}
        return tuple(sorted(unbuilt))

    def _refusal(self, call: _Decision, share: list[int], decision: Decision) -> Decision:
        """The refusal with every layer's figures, and the longest wait among every slot's
        refusing layers (the slots not asked yet are asked too: nothing stays charged)."""
        done = [(group, _uncharged(call, group, d.figures)) for group, d in call.taken]
        done.append((share, decision.figures))
        refusing, retry = _global(share, decision.refusing), decision.retry_ms
        own, others = self._shares(call.scope, call.counters)
        asked = {i for group, _ in done for i in group}
        for group in [*others, own]:
            if not group or asked.intersection(group):
                continue
            probe = self._share(call, group, seeded=False)
            if probe.status is DecisionStatus.ALLOWED:
                self._give_back(call, [(group, probe)])
                done.append((group, _uncharged(call, group, probe.figures)))
            elif probe.status is DecisionStatus.OVER_LIMIT and probe.retry_ms > retry:
                refusing, retry = _global(group, probe.refusing), probe.retry_ms
                done.append((group, probe.figures))
            elif probe.status is DecisionStatus.OVER_LIMIT:
                done.append((group, probe.figures))
        figs = _figures(len(call.counters), done, [])
        return replace(decision, refusing=refusing, retry_ms=retry, figures=figs)

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
        """``RedisWindowStore.peek``, one script per slot."""
        own, others = self._shares(scope, counters)
        parts, unbuilt, result = [], [], Peek()
        for group in [own, *others]:
            if group:
                peek = self._peek_group(scope, counters, group, primary, seeds or {}, now_ms)
                unbuilt += [group[i - 1] + 1 for i in peek.unbuilt]
                parts.append((group, peek.figures))
                result = peek if group is own else result
        if unbuilt:
            return Peek(unbuilt=tuple(sorted(unbuilt)))
        return replace(result, figures=_figures(len(counters), parts, []))

    def _peek_group(
        self,
        scope: str,
        counters: Sequence[Counter],
        group: list[int],
        primary: int,
        seeds: Mapping[int, Any],
        now_ms: int | None,
    ) -> Peek:
        tag = counters[group[0]].tag
        if self.slot_of(tag) == self.slot_of(scope):
            tag = scope
        return RedisWindowStore.peek(
            self,
            tag,
            [counters[i] for i in group],
            primary=_local(group, primary),
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
        outcome = super().settle(
            scope,
            reservation_id,
            [counters[i] for i in own],
            primary=_local(own, primary),
            now_ms=now_ms,
            **figures_,
        )
        parts = [(own, outcome.figures)]
        parts += [(g, self._settle_other(counters, g, outcome, now_ms)) for g in others]
        return replace(outcome, figures=_figures(len(counters), parts, []))

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
            at = now_ms_local() if now_ms is None else now_ms
        else:
            deltas, at = [0] * len(group), now_ms_local() if now_ms is None else now_ms
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


def _local(group: list[int], index: int) -> int:
    """A 1-based index among all counters as a 1-based index within ``group`` (0: none)."""
    return group.index(index - 1) + 1 if index and (index - 1) in group else 0


def _uncharged(call: _Decision, group: list[int], figs: Sequence[Figure]) -> tuple[Figure, ...]:
    """A slot's figures without this request's charge (given back)."""
    return tuple(
        Figure(max(f.total - call.amounts[i], 0), f.reset_ms)
        for i, f in zip(group, figs, strict=True)
    )


def _figures(
    n: int,
    parts: Sequence[tuple[list[int], Sequence[Figure]]],
    taken: Sequence[tuple[list[int], Decision]],
) -> tuple[Figure, ...]:
    """Every counter's figure, from each slot's share (a counter no slot answered for: 0)."""
    figs = [Figure(0, 0)] * n
    for group, values in [*parts, *((group, d.figures) for group, d in taken)]:
        for i, value in zip(group, values, strict=True):
            figs[i] = value
    return tuple(figs)


def _local_seeds(seeds: Mapping[int, Any], group: list[int]) -> dict[int, Any]:
    """The seeds of ``group``'s counters, by their 1-based index within the group."""
    return {group.index(i - 1) + 1: seed for i, seed in seeds.items() if (i - 1) in group}


def _global(group: list[int], local: int) -> int:
    """A 1-based index within ``group`` as a 1-based index among all counters."""
    return group[local - 1] + 1 if local else 0


def _units(counter: Counter, tokens: int, cost: int, *, requests: int = 0) -> int:
    return {"t": tokens, "c": cost, "r": requests}[counter.metric_code]
