"""Counting in one process while the store is unreachable: the bound of fail-open.

While a process's circuit breaker is open, no decision can reach Redis. Fail-open still
serves, but never more, in this process, than ``share`` of each limit's budget per window:
every limit of the decision (the user's, the team's, the global ones; tokens, requests and
cost) is counted here, per window, as Redis would count it. With ``N`` processes the overshoot
of an outage is then at most ``N * share * budget`` per window, whatever the traffic.

Conservative by construction: a sliding window's bucket still counts while any part of it is
inside the window (so no window of the true length ever holds more than the allowance); a
calendar period counts from its start, as in Redis. Framework-free; thread-safe; memory-bound
(the least recently used counters and reservations are forgotten past ``max_counters`` and
``max_reservations``); the clock is the caller's.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from quotas.core.limits import Limit

__all__ = ["Concurrency", "LocalVerdict", "LocalWindows"]


@dataclass
class _Count:
    """One limit's usage in this process: amounts by bucket start (sliding) or the current
    period's start and its total (calendar)."""

    buckets: dict[int, int] = field(default_factory=dict)

    def total(self, limit: Limit, now_ms: int) -> int:
        self._forget(limit, now_ms)
        return sum(self.buckets.values())

    def add(self, limit: Limit, at_ms: int, amount: int) -> None:
        slot = _slot(limit, at_ms)
        if slot in self.buckets or amount > 0:
            self.buckets[slot] = max(self.buckets.get(slot, 0) + amount, 0)

    def free_after(self, limit: Limit, now_ms: int, needed: int) -> int:
        """Milliseconds until at least ``needed`` units have left the window."""
        window = limit.window
        if not window.is_sliding:
            return window.boundaries(now_ms)[2] - now_ms
        freed = 0
        for start in sorted(self.buckets):
            freed += self.buckets[start]
            if freed >= needed:
                return max(start + window.bucket_ms + window.window_ms - now_ms, 1)
        return window.window_ms

    def _forget(self, limit: Limit, now_ms: int) -> None:
        window = limit.window
        if window.is_sliding:
            oldest = now_ms - window.window_ms - window.bucket_ms
            stale = [start for start in self.buckets if start <= oldest]
        else:
            current = window.boundaries(now_ms)[1]
            stale = [start for start in self.buckets if start != current]
        for start in stale:
            del self.buckets[start]


def _slot(limit: Limit, at_ms: int) -> int:
    window = limit.window
    if window.is_sliding:
        return at_ms - at_ms % window.bucket_ms
    return window.boundaries(at_ms)[1]


@dataclass(frozen=True)
class LocalVerdict:
    """What this process decided alone. ``refusing`` is the 1-based index of the limit that
    refused (0: allowed; -1: the concurrent-request limit); ``used`` and ``allowed`` are each
    limit's local usage before this request and its local allowance (``share`` of the
    budget); ``retry_ms`` is when the refusing limit has room again in this process
    (``None``: never in this process, the request is larger than the allowance);
    ``in_flight`` and ``slots`` are the scope's requests in flight here and its local
    allowance of them, when a concurrent-request limit applies."""

    refusing: int
    used: tuple[int, ...]
    allowed: tuple[int, ...]
    retry_ms: int | None = 0
    in_flight: int = 0
    slots: int = 0

    @property
    def admitted(self) -> bool:
        return self.refusing == 0


def _retry_ms(
    count: _Count, limit: Limit, now_ms: int, used: int, amount: int, room: int
) -> int | None:
    """Milliseconds until ``amount`` fits beside what is used; ``None``: it never fits (the
    request is larger than the whole room)."""
    return None if amount > room else count.free_after(limit, now_ms, used + amount - room)


@dataclass(frozen=True)
class _Charge:
    keys: tuple[str, ...]
    limits: tuple[Limit, ...]
    at_ms: int
    scope: str = ""  # counted among the scope's requests in flight until settled ...
    until_ms: int = 0  # ... or until it expires, as in Redis


@dataclass(frozen=True)
class Concurrency:
    """A concurrent-request limit for ``admit``: ``scope``'s requests in flight (admitted
    here, not settled, younger than their ``ttl_ms``) may be at most ``share`` of ``slots``
    (never less than one)."""

    scope: str
    slots: int
    ttl_ms: int


class LocalWindows:
    """Every limit's usage in this process while the store is unreachable (see the module
    docstring). ``admit`` decides and charges in one step; ``settle`` replaces a charge's
    estimate with the actual usage; ``clear`` forgets everything (the store is back)."""

    def __init__(self, max_counters: int = 10_000, max_reservations: int = 10_000) -> None:
        self.max_counters = max_counters
        self.max_reservations = max_reservations
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._charges: OrderedDict[str, _Charge] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def admit(
        self,
        reservation_id: str,
        keys: Sequence[str],
        limits: Sequence[Limit],
        amounts: Sequence[int],
        share: float,
        now_ms: int,
        concurrency: Concurrency | None = None,
    ) -> LocalVerdict:
        """Charge ``amounts`` to every limit if each stays within ``share`` of its budget in
        this process (and the scope within its share of ``concurrency``), else charge
        nothing and say which refused (all or nothing, as Redis)."""
        allowed = tuple(math.floor(limit.budget * share) for limit in limits)
        with self._lock:
            counts = [self._count(key) for key in keys]
            used = tuple(c.total(lim, now_ms) for c, lim in zip(counts, limits, strict=True))
            in_flight = slots = 0
            if concurrency is not None:
                slots = max(math.floor(concurrency.slots * share), 1)
                in_flight = self._in_flight(concurrency.scope, now_ms)
            for i, (amount, room) in enumerate(zip(amounts, allowed, strict=True)):
                if amount > 0 and used[i] + amount > room:
                    retry = _retry_ms(counts[i], limits[i], now_ms, used[i], amount, room)
                    return LocalVerdict(i + 1, used, allowed, retry, in_flight, slots)
            if concurrency is not None and in_flight >= slots:
                return LocalVerdict(-1, used, allowed, 0, in_flight, slots)
            for count, limit, amount in zip(counts, limits, amounts, strict=True):
                count.add(limit, now_ms, amount)
            scope, until = "", 0
            if concurrency is not None:
                scope, until = concurrency.scope, now_ms + concurrency.ttl_ms
            self._remember(
                reservation_id, _Charge(tuple(keys), tuple(limits), now_ms, scope, until)
            )
        return LocalVerdict(0, used, allowed, 0, in_flight, slots)

    def _in_flight(self, scope: str, now_ms: int) -> int:
        """``scope``'s charges not settled and not expired (their slots, as Redis counts)."""
        return sum(1 for c in self._charges.values() if c.scope == scope and c.until_ms > now_ms)

    def settle(self, reservation_id: str, deltas: Sequence[int]) -> bool:
        """Add ``deltas`` (actual minus charged, per limit) to the reservation's charge, once;
        ``False`` when this process holds no charge for it (settled already, or forgotten)."""
        with self._lock:
            charge = self._charges.pop(reservation_id, None)
            if charge is None:
                return False
            for key, limit, delta in zip(charge.keys, charge.limits, deltas, strict=False):
                count = self._counts.get(key)
                if count is not None and delta:
                    count.add(limit, charge.at_ms, delta)
        return True

    def clear(self) -> None:
        """Forget every count and charge: the store decides again."""
        with self._lock:
            self._counts.clear()
            self._charges.clear()

    def _count(self, key: str) -> _Count:
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = _Count()
            while len(self._counts) > self.max_counters:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        return count

    def _remember(self, reservation_id: str, charge: _Charge) -> None:
        self._charges[reservation_id] = charge
        while len(self._charges) > self.max_reservations:
            self._charges.popitem(last=False)
