"""Contract tests of layered decisions in the Redis store, with the clock injected: several
counters (sliding windows of other lengths, calendar periods in a time zone) decided and
corrected all or nothing, each in its own bucket."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django_redis import get_redis_connection

from quotas.backends.redis import RedisWindowStore
from quotas.core.decisions import Counter, DecisionStatus
from quotas.core.limits import Limit, Metric, Period, Scope, Window
from quotas.core.types import WindowSpec

T0 = 1_800_000_000_000  # a bucket boundary for every bucket size used here
TTL = 600_000
PARIS = ZoneInfo("Europe/Paris")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@pytest.fixture
def store() -> Any:
    client = get_redis_connection("default")
    prefix = f"test-layers-{uuid.uuid4().hex[:8]}"
    yield RedisWindowStore(client, prefix=prefix, spec=WindowSpec.from_seconds(6, 0.5))
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def primary(store: Any, budget: int = 100_000) -> Limit:
    spec = store.spec
    hour = Window.sliding(spec.window_ms / 1000, spec.bucket_ms / 1000)
    return Limit(Scope.USER, Metric.TOKENS, budget, hour, counter="w")


def team_hour(budget: int) -> Limit:
    return Limit(Scope.TEAM, Metric.TOKENS, budget, Window.sliding(6, 0.5))


def global_minute(budget: int) -> Limit:
    return Limit(Scope.GLOBAL, Metric.TOKENS, budget, Window.sliding(60, 1))


def month(budget: int, zone: str = "Europe/Paris") -> Limit:
    return Limit(Scope.USER, Metric.TOKENS, budget, Window.calendar(Period.MONTH, zone))


def charges(store: Any, limits: list[tuple[str, Limit]], tokens: int = 0) -> list[Counter]:
    return [Counter(tag, limit) for tag, limit in limits]


def reserve(
    store: Any, limits: list[tuple[str, Limit]], tokens: int, at: int, rid: str | None = None
) -> Any:
    counters = charges(store, limits, tokens)
    seeds = {i: ("e", []) for i, c in enumerate(counters, 1) if c.seeded}
    return store.reserve(
        "u",
        rid or uuid.uuid4().hex,
        counters,
        [tokens] * len(counters),
        ttl_ms=TTL,
        primary=1,
        tokens=tokens,
        seeds=seeds,
        now_ms=at,
    )


def totals(store: Any, limits: list[tuple[str, Limit]], at: int) -> list[int]:
    peek = store.peek("u", charges(store, limits, 0), primary=1, now_ms=at)
    return [figure.total for figure in peek.figures]


def test_every_layer_is_charged_or_none_is(store: Any) -> None:
    layers = [("u", primary(store)), ("t:1", team_hour(1000)), ("g", global_minute(1500))]
    assert reserve(store, layers, 700, T0).status is DecisionStatus.ALLOWED
    refused = reserve(store, layers, 400, T0 + 10)  # fits the user and global, not the team
    assert (refused.status, refused.refusing) == (DecisionStatus.OVER_LIMIT, 2)
    assert totals(store, layers, T0 + 20) == [700, 700, 700]  # the refusal charged nothing
    other_user = [("t:1", team_hour(1000)), ("g", global_minute(1500))]
    assert reserve(store, other_user, 300, T0 + 30).status is DecisionStatus.ALLOWED
    assert totals(store, layers, T0 + 40) == [700, 1000, 1000]


def test_the_longest_wait_of_the_refusing_layers_is_the_retry(store: Any) -> None:
    layers = [("u", primary(store, 1000)), ("g", global_minute(1000))]
    reserve(store, layers, 900, T0)
    refused = reserve(store, layers, 200, T0 + 100)
    # The 6 s window frees its bucket at T0 + 6500; the minute's at T0 + 61 s: it binds.
    assert (refused.refusing, refused.retry_ms) == (2, 60_900)


def test_a_settle_corrects_every_layer_in_the_bucket_it_was_charged_to(store: Any) -> None:
    layers = [("u", primary(store)), ("t:1", team_hour(10_000)), ("g", global_minute(10_000))]
    reserve(store, layers, 500, T0, rid="a")
    reserve(store, layers, 100, T0 + 3_000, rid="b")
    counters = charges(store, layers, 0)
    settled = store.settle(
        "u", "a", counters, actual_tokens=200, epoch="e", primary=1, now_ms=T0 + 4_000
    )
    assert [f.total for f in settled.figures] == [300, 300, 300]
    # The refund went to the first bucket of each layer, so it ages out with it: once the
    # 6 s windows' first bucket leaves, only "b" remains there; the minute keeps both.
    assert totals(store, layers, T0 + 6_500) == [100, 100, 300]


def test_a_calendar_month_resets_exactly_at_its_boundary_in_its_time_zone(store: Any) -> None:
    layers = [("u", primary(store)), ("u", month(1000))]
    last_second = ms(datetime(2026, 1, 31, 23, 59, 59, tzinfo=PARIS))
    assert reserve(store, layers, 800, last_second).status is DecisionStatus.ALLOWED
    refused = reserve(store, layers, 300, last_second + 500)
    assert (refused.refusing, refused.retry_ms) == (2, 500)  # until midnight in Paris
    new_month = ms(datetime(2026, 2, 1, tzinfo=PARIS))
    assert reserve(store, layers, 800, new_month).status is DecisionStatus.ALLOWED
    assert totals(store, layers, new_month + 1)[1] == 800


def test_redis_clock_picks_the_period_when_the_app_servers_clock_is_skewed(store: Any) -> None:
    layers = [("u", primary(store)), ("u", month(1000))]
    counters = charges(store, layers)
    new_month = ms(datetime(2026, 2, 1, 0, 0, 1, tzinfo=PARIS))
    seeds = {1: ("e", []), 2: ("e", [])}

    def reserve_skewed(rid: str, tokens: int, skew_ms: int) -> Any:
        return store.reserve(
            "u", rid, counters, [tokens, tokens], ttl_ms=TTL, primary=1, tokens=tokens,
            seeds=seeds, now_ms=new_month, client_ms=new_month + skew_ms,
        )  # fmt: skip

    store.reserve(
        "u", "jan", counters, [900, 900], ttl_ms=TTL, primary=1, tokens=900, seeds=seeds,
        now_ms=new_month - 5_000,
    )  # fmt: skip
    # Redis says February; an app server 3 s behind still thinks it is January: February.
    assert reserve_skewed("a", 900, -3_000).status is DecisionStatus.ALLOWED
    # One 3 s ahead is also in February (its boundaries name January as the period before).
    assert reserve_skewed("b", 200, 3_000).status is DecisionStatus.OVER_LIMIT


def test_a_request_that_exactly_fills_a_period_fits(store: Any) -> None:
    layers = [("u", primary(store)), ("u", month(1000))]
    at = ms(datetime(2026, 1, 10, tzinfo=PARIS))
    assert reserve(store, layers, 600, at).status is DecisionStatus.ALLOWED
    assert reserve(store, layers, 400, at + 1).status is DecisionStatus.ALLOWED
    assert reserve(store, layers, 1, at + 2).status is DecisionStatus.OVER_LIMIT


def test_a_settle_after_the_period_changed_corrects_nothing(store: Any) -> None:
    layers = [("u", primary(store)), ("u", month(1000))]
    last_second = ms(datetime(2026, 1, 31, 23, 59, 59, tzinfo=PARIS))
    reserve(store, layers, 800, last_second, rid="a")
    new_month = ms(datetime(2026, 2, 1, 0, 0, 1, tzinfo=PARIS))
    reserve(store, layers, 100, new_month, rid="b")
    counters = charges(store, layers, 0)
    store.settle("u", "a", counters, actual_tokens=0, epoch="e", primary=1, now_ms=new_month)
    assert totals(store, layers, new_month + 1)[1] == 100  # January's refund left February


def test_a_calendar_day_across_a_dst_change(store: Any) -> None:
    new_york = ZoneInfo("America/New_York")
    day = Limit(Scope.USER, Metric.TOKENS, 1000, Window.calendar(Period.DAY, "America/New_York"))
    layers = [("u", primary(store)), ("u", day)]
    # 2026-03-08 has 23 hours in New York: it ends at 04:00 UTC on the 9th.
    late = ms(datetime(2026, 3, 8, 23, 30, tzinfo=new_york))
    assert reserve(store, layers, 900, late).status is DecisionStatus.ALLOWED
    refused = reserve(store, layers, 200, late + 1)
    assert refused.retry_ms == 30 * 60_000 - 1
    assert reserve(store, layers, 900, ms(datetime(2026, 3, 9, tzinfo=new_york))).refusing == 0


def test_short_windows_start_empty_long_ones_ask_to_be_seeded(store: Any) -> None:
    minute = Limit(Scope.USER, Metric.REQUESTS, 5, Window.sliding(60, 1))
    counters = [
        Counter("u", primary(store)),
        Counter("u", minute, seeded=False),
        Counter("u", month(1000)),
    ]
    decision = store.reserve(
        "u", "a", counters, [10, 1, 10], ttl_ms=TTL, primary=1, tokens=10, now_ms=T0
    )
    assert decision.unbuilt == (1, 3)  # the minute needs no seed


def test_seeds_rebuild_a_long_window_and_a_period(store: Any) -> None:
    day = Limit(Scope.USER, Metric.TOKENS, 10_000, Window.sliding(86_400, 1_440))
    counters = [
        Counter("u", primary(store)),
        Counter("u", day),
        Counter("u", month(5_000)),
    ]
    january = ms(datetime(2026, 1, 20, tzinfo=PARIS))
    start = ms(datetime(2026, 1, 1, tzinfo=PARIS))
    seeds = {
        1: ("e", []),
        2: ("e", [(january // 1_440_000 - 3, 700)]),
        3: ("e", [(start, 2_000)]),
    }
    decision = store.reserve(
        "u", "a", counters, [10] * 3, ttl_ms=TTL, primary=1, tokens=10, seeds=seeds, now_ms=january
    )
    assert decision.status is DecisionStatus.ALLOWED
    assert [f.total for f in decision.figures] == [10, 710, 2_010]


def test_every_counter_key_carries_its_scopes_hash_tag_and_a_ttl(store: Any) -> None:
    layers = [("u", primary(store)), ("t:9", team_hour(1000)), ("g", global_minute(1000))]
    reserve(store, layers, 10, None)
    for key in store.counter_keys(charges(store, layers, 0)):
        assert store.client.pttl(key) > 0
    assert [
        key.split("{")[1].split("}")[0] for key in store.counter_keys(charges(store, layers, 0))
    ] == ["u", "t:9", "g"]


def test_a_calendar_counter_outlives_its_period_also_after_a_rollover_no_charge_made(
    store: Any,
) -> None:
    """The TTL is set once per period (PEXPIRE runs on Redis's clock, the period's end is a
    moment): a month opened anew by a peek (which charges nothing) gets its own at the next
    charge."""
    layers = [("u", primary(store)), ("u", month(10**9))]
    key = store.counter_keys(charges(store, layers, 0))[1]
    grace = 3600 * 1000

    def lasts_until_the_end_of(at: int, end: datetime) -> bool:
        return store.client.pttl(key) >= ms(end) - at + grace - 5_000

    jan_20 = ms(datetime(2026, 1, 20, tzinfo=PARIS))
    jan_25 = ms(datetime(2026, 1, 25, tzinfo=PARIS))
    feb_3 = ms(datetime(2026, 2, 3, tzinfo=PARIS))
    reserve(store, layers, 10, jan_20)
    assert lasts_until_the_end_of(jan_20, datetime(2026, 2, 1, tzinfo=PARIS))
    reserve(store, layers, 10, jan_25)
    assert lasts_until_the_end_of(jan_25, datetime(2026, 2, 1, tzinfo=PARIS))
    assert totals(store, layers, feb_3)[1] == 0  # February opened by the peek
    reserve(store, layers, 10, feb_3 + 1)
    assert lasts_until_the_end_of(feb_3 + 1, datetime(2026, 3, 1, tzinfo=PARIS))
