"""The local windows that bound fail-open: driven by explicit timestamps, no Redis."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from quotas.core.degraded import Concurrency, LocalWindows
from quotas.core.limits import Limit, Metric, Period, Scope, Window

HOUR = Limit(Scope.USER, Metric.TOKENS, 1000, Window.sliding(3600, 60), counter="w")
RPM = Limit(Scope.USER, Metric.REQUESTS, 3, Window.sliding(60, 1), counter="q")
TEAM_DAY = Limit(Scope.TEAM, Metric.TOKENS, 500, Window.calendar(Period.DAY))
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000  # a bucket boundary


def admit(local, rid, amounts, share=1.0, at=T0, limits=(HOUR, RPM), keys=("u/w", "u/q")):
    return local.admit(rid, keys, limits, amounts, share, at)


def test_admits_up_to_the_budget_then_refuses_with_the_time_room_returns():
    local = LocalWindows()
    assert admit(local, "a", (600, 1)).admitted
    assert admit(local, "b", (400, 1)).admitted
    refused = admit(local, "c", (1, 1), at=T0 + 5_000)
    assert refused.refusing == 1 and refused.used == (1000, 2) and refused.allowed == (1000, 3)
    # The bucket of T0 leaves the window (conservatively, whole) an hour and a bucket later.
    assert refused.retry_ms == 3600_000 + 60_000 - 5_000
    assert admit(local, "d", (1, 1), at=T0 + 3660_000).admitted


def test_a_refusal_charges_nothing_at_any_limit():
    local = LocalWindows()
    for i in range(3):
        assert admit(local, f"r{i}", (10, 1)).admitted
    refused = admit(local, "x", (10, 1))
    assert refused.refusing == 2  # the requests limit
    assert admit(local, "y", (0, 0)).used == (30, 3)


def test_the_share_scales_every_allowance_and_a_request_over_it_can_never_fit():
    local = LocalWindows()
    # A quarter of 3 requests a minute is none: the allowance is rounded down, never up.
    assert admit(local, "a", (0, 1), share=0.25).refusing == 2
    assert admit(local, "b", (250, 0), share=0.25).admitted
    refused = admit(local, "c", (1, 0), share=0.25)
    assert refused.allowed == (250, 0) and refused.refusing == 1
    too_big = admit(LocalWindows(), "c", (251, 0), share=0.25)
    assert too_big.refusing == 1 and too_big.retry_ms is None


def test_settling_replaces_the_estimate_with_the_actual_usage_once():
    local = LocalWindows()
    assert admit(local, "a", (900, 1)).admitted
    assert local.settle("a", (-800, 0))  # 100 used of 900 held
    assert not local.settle("a", (-800, 0))  # a second settle changes nothing
    assert admit(local, "b", (900, 1)).admitted
    assert not admit(local, "c", (1, 0)).admitted


def test_a_calendar_day_counts_from_its_start_and_resets_at_midnight():
    local = LocalWindows()
    noon = int(datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp() * 1000)
    midnight = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)
    kw = {"limits": (TEAM_DAY,), "keys": ("t:1/d",)}
    assert admit(local, "a", (500,), at=noon, **kw).admitted
    refused = admit(local, "b", (1,), at=noon, **kw)
    assert refused.refusing == 1 and refused.retry_ms == midnight - noon
    assert admit(local, "c", (500,), at=midnight, **kw).admitted


def test_clear_forgets_everything_and_memory_is_bounded():
    local = LocalWindows(max_counters=100, max_reservations=50)
    for i in range(1000):
        admit(local, f"r{i}", (1, 1), keys=(f"{i}/w", f"{i}/q"))
    assert len(local) == 100 and len(local._charges) == 50
    local.clear()
    assert len(local) == 0 and not local.settle("r999", (0, 0))


def test_threads_together_never_admit_more_than_the_allowance():
    local = LocalWindows()
    admitted: list[int] = []

    def hammer(n: int) -> None:
        for i in range(200):
            if admit(local, f"{n}-{i}", (7, 0)).admitted:
                admitted.append(7)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 1000 // 7 * 7


def test_requests_in_flight_are_counted_until_settled_or_expired():
    local = LocalWindows()
    two = Concurrency("u", slots=2, ttl_ms=30_000)
    assert local.admit("a", ("u/w",), (HOUR,), (10,), 1.0, T0, two).admitted
    assert local.admit("b", ("u/w",), (HOUR,), (10,), 1.0, T0, two).admitted
    refused = local.admit("c", ("u/w",), (HOUR,), (10,), 1.0, T0 + 1, two)
    assert (refused.refusing, refused.in_flight, refused.slots) == (-1, 2, 2)
    assert refused.used == (20,)  # a refusal charges nothing
    # Another scope has slots of its own.
    assert local.admit("x", ("v/w",), (HOUR,), (10,), 1.0, T0, Concurrency("v", 2, 30_000)).admitted
    assert local.settle("a", (0,))  # a settled request frees its slot
    assert local.admit("c", ("u/w",), (HOUR,), (10,), 1.0, T0 + 2, two).admitted
    assert not local.admit("d", ("u/w",), (HOUR,), (10,), 1.0, T0 + 3, two).admitted
    # An expired reservation no longer holds its slot (Redis forgets it too).
    assert local.admit("d", ("u/w",), (HOUR,), (10,), 1.0, T0 + 30_001, two).admitted


def test_the_share_scales_the_slots_but_leaves_at_least_one():
    local = LocalWindows()
    four = Concurrency("u", slots=4, ttl_ms=30_000)
    for rid in "ab":
        assert local.admit(rid, ("u/w",), (HOUR,), (1,), 0.5, T0, four).admitted
    assert local.admit("c", ("u/w",), (HOUR,), (1,), 0.5, T0, four).slots == 2
    one = Concurrency("v", slots=1, ttl_ms=30_000)
    assert local.admit("d", ("v/w",), (HOUR,), (1,), 0.1, T0, one).admitted
    assert local.admit("e", ("v/w",), (HOUR,), (1,), 0.1, T0, one).refusing == -1
