"""What the store is asked and what it answers, for a layered decision. Framework-free.

A ``Counter`` is one limit as Redis counts it: the key of its hash, how it counts (a sliding
window, or a calendar period), its budget and what this request charges to it. The store's
scripts take a list of counters and answer a ``Decision`` (reserve), a ``SettleOutcome``
(settle) or a ``Peek`` (a snapshot): each gives a ``Figure`` (total, reset) per counter, in
the order the counters were given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

from quotas.core.limits import Limit, Metric, Scope

__all__ = [
    "Counter",
    "Decision",
    "DecisionStatus",
    "Figure",
    "Peek",
    "SettleOutcome",
    "counter_args",
    "flat_seeds",
]

METRIC_CODES = {Metric.TOKENS: "t", Metric.REQUESTS: "r", Metric.COST: "c"}
# Windows this short are not rebuilt from the ledger when Redis loses them: their rows are
# mostly still on their way, and a fresh minute costs at most a minute's budget.
SEED_MIN_WINDOW_MS = 300_000


@dataclass(frozen=True)
class Counter:
    """One limit of a decision as Redis counts it: ``tag`` (the hash tag its key lives under:
    a quota key, ``t:<team id>``, ``g``), ``limit`` (budget and window; its ``key`` names the
    counter within the tag), ``seeded`` (rebuilt from the ledger when Redis lost it, or
    starting empty). What one request charges to it is given beside it (``amounts``)."""

    tag: str
    limit: Limit
    seeded: bool = True

    @cached_property
    def name(self) -> str:
        """What a reservation record calls it: the limit's key, prefixed by the tag unless it
        is the reservation's own quota key (``w``, ``t:7/l.t.…``, ``g/l.r.…``)."""
        return self.limit.key if self.limit.scope is Scope.USER else f"{self.tag}/{self.limit.key}"

    @cached_property
    def metric_code(self) -> str:
        return METRIC_CODES[self.limit.metric]

    def args(self, now_ms: int, slot: int | str) -> list[int | str]:
        """The 7 script arguments of this counter (see ``_window.lua``); ``slot`` is the
        amount to charge (reserve) or the metric code (settle)."""
        window = self.limit.window
        if window.is_sliding:
            return [self.kind, self.limit.budget, slot, window.window_ms, window.bucket_ms, 0, 0]
        return [self.kind, self.limit.budget, slot, *window.boundaries(now_ms)]

    @cached_property
    def kind(self) -> str:
        """``s`` sliding, ``c`` calendar; upper case: starts empty rather than seeded."""
        kind = "s" if self.limit.window.is_sliding else "c"
        return kind if self.seeded else kind.upper()


def counter_args(
    counters: Sequence[Counter], now_ms: int, amounts: Sequence[int] | None = None
) -> list:
    """The flat script arguments of ``counters``: what each charges (``amounts``), or each
    one's metric code (``amounts`` ``None``: a settle)."""
    args: list[int | str] = []
    if amounts is None:
        for counter in counters:
            args += counter.args(now_ms, counter.metric_code)
    else:
        for counter, amount in zip(counters, amounts, strict=True):
            args += counter.args(now_ms, amount)
    return args


def flat_seeds(seeds: Mapping[int, tuple[str, Sequence[tuple[int, int]]]]) -> list[int | str]:
    """``S``, then per seeded counter (1-based index): index, epoch, pair count, pairs."""
    args: list[int | str] = [len(seeds)]
    for index, (epoch, pairs) in sorted(seeds.items()):
        args += [index, epoch, len(pairs)]
        for bucket, units in pairs:
            args += [bucket, units]
    return args


@dataclass(frozen=True)
class Figure:
    """A counter's state after a script ran: units counted now, and ms until all are gone."""

    total: int
    reset_ms: int


def figures(flat: Sequence[int | bytes | str]) -> tuple[Figure, ...]:
    values = [int(v) for v in flat]
    return tuple(Figure(t, r) for t, r in zip(values[::2], values[1::2], strict=True))


class DecisionStatus(IntEnum):
    ALLOWED = 1
    OVER_LIMIT = 0
    OVER_CONCURRENCY = 3
    DUPLICATE_ID = 6
    OVER_ATTEMPTS = 7
    STALE_CONFIG = -2
    NEEDS_SEED = -3


@dataclass(frozen=True)
class Decision:
    """What reserve.lua decided. ``refusing`` is the 1-based index of the counter that
    refused (the one whose room comes back last); ``retry_ms`` when the request fits;
    ``version`` the current config version (``STALE_CONFIG``); ``unbuilt`` the counters to
    seed (``NEEDS_SEED``)."""

    status: DecisionStatus
    refusing: int = 0
    retry_ms: int = 0
    now_ms: int = 0
    epoch: str = ""
    bucket: int = 0
    reserved: int = 0
    in_flight: int = 0
    figures: tuple[Figure, ...] = ()
    version: str = ""
    unbuilt: tuple[int, ...] = ()

    @classmethod
    def from_script(cls, raw: list) -> Decision:
        status = DecisionStatus(int(raw[0]))
        if status is DecisionStatus.STALE_CONFIG:
            return cls(status, version=_text(raw[1]))
        if status is DecisionStatus.NEEDS_SEED:
            return cls(status, unbuilt=tuple(int(i) for i in raw[1:]))
        refusing, retry, now, epoch, bucket, reserved, in_flight = raw[1:8]
        return cls(
            status,
            refusing=int(refusing),
            retry_ms=int(retry),
            now_ms=int(now),
            epoch=_text(epoch),
            bucket=int(bucket),
            reserved=int(reserved),
            in_flight=int(in_flight),
            figures=figures(raw[8:]),
        )


@dataclass(frozen=True)
class SettleOutcome:
    """What settle.lua did. ``status``: 1 settled; 0 unknown id (already settled or expired:
    nothing changed); 2 Redis had lost the reservation and the actual usage was charged to
    the rebuilt counters; 3 the primary counter is not rebuilt yet (the ledger row will seed
    it). The other figures are Redis's when it knew the reservation."""

    status: int
    applied: int
    estimate: int
    reserved_at_ms: int
    actual: int
    model: str
    estimated_cost: int
    cost: int
    team: str
    figures: tuple[Figure, ...]

    @property
    def settled_now(self) -> bool:
        return self.status != 0

    @classmethod
    def from_script(cls, raw: list) -> SettleOutcome:
        status, applied, estimate, reserved_at, actual = (int(v) for v in raw[:5])
        return cls(
            status,
            applied,
            estimate,
            reserved_at,
            actual,
            model=_text(raw[5]),
            estimated_cost=int(raw[6] or 0),
            cost=int(raw[7] or 0),
            team=_text(raw[8]),
            figures=figures(raw[9:]),
        )


@dataclass(frozen=True)
class Peek:
    """A snapshot: tokens reserved in the primary counter, requests in flight, and every
    counter's figure; or (``unbuilt`` not empty) the counters to seed first."""

    reserved: int = 0
    in_flight: int = 0
    figures: tuple[Figure, ...] = ()
    unbuilt: tuple[int, ...] = ()

    @classmethod
    def from_script(cls, raw: list) -> Peek:
        if int(raw[0]) == DecisionStatus.NEEDS_SEED:
            return cls(unbuilt=tuple(int(i) for i in raw[1:]))
        return cls(int(raw[1]), int(raw[2]), figures(raw[3:]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
