"""Unit tests of the layered-limit value types: windows, calendar periods, globs, prices."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from quotas.core.globs import glob_error, glob_matches, globs_overlap, specificity
from quotas.core.limits import Limit, Metric, Period, Scope, Window
from quotas.core.pricing import Price, PriceTable, cost_micros


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# -- windows ------------------------------------------------------------------------------
def test_a_sliding_window_defaults_to_sixty_buckets() -> None:
    assert Window.sliding(3600).bucket_ms == 60_000
    assert Window.sliding(60).bucket_ms == 1_000
    assert Window.sliding(86_400).bucket_ms == 1_440_000


@pytest.mark.parametrize(("seconds", "bucket"), [(100, 30), (60, 0), (10, 20), (100_000, 1)])
def test_a_window_that_is_not_a_multiple_of_its_bucket_is_refused(seconds, bucket) -> None:
    with pytest.raises(ValueError, match=r"bucket|buckets"):
        Window(Period.SLIDING, seconds, bucket)


def test_window_names() -> None:
    assert Window.sliding(60).name == "minute"
    assert Window.sliding(3600).name == "hour"
    assert Window.sliding(86_400).name == "1d"
    assert Window.sliding(7200, 60).name == "2h"
    assert Window.sliding(90, 1).name == "90s"
    assert Window.sliding(2.5, 0.5).name == "2.5s"
    assert Window.calendar(Period.MONTH).name == "month"


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        Window.calendar(Period.DAY, "Mars/Olympus")


def test_calendar_day_boundaries_are_local_midnights() -> None:
    zone = ZoneInfo("Europe/Paris")
    now = ms(datetime(2026, 7, 14, 23, 30, tzinfo=zone))
    bounds = Window.calendar(Period.DAY, "Europe/Paris").boundaries(now)
    expected = [datetime(2026, 7, day, tzinfo=zone) for day in (13, 14, 15, 16)]
    assert list(bounds) == [ms(moment) for moment in expected]


def test_calendar_month_boundaries_cross_the_year() -> None:
    now = ms(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    bounds = Window.calendar(Period.MONTH).boundaries(now)
    assert list(bounds) == [
        ms(datetime(2026, 11, 1, tzinfo=UTC)),
        ms(datetime(2026, 12, 1, tzinfo=UTC)),
        ms(datetime(2027, 1, 1, tzinfo=UTC)),
        ms(datetime(2027, 2, 1, tzinfo=UTC)),
    ]
    # One second later it is January: the current period moved on.
    assert Window.calendar(Period.MONTH).boundaries(now + 1000)[1] == ms(
        datetime(2027, 1, 1, tzinfo=UTC)
    )


def test_a_day_with_a_dst_change_is_23_or_25_hours_long() -> None:
    window = Window.calendar(Period.DAY, "America/New_York")
    zone = ZoneInfo("America/New_York")
    spring = ms(datetime(2026, 3, 8, 12, tzinfo=zone))  # clocks go forward at 02:00
    autumn = ms(datetime(2026, 11, 1, 12, tzinfo=zone))  # clocks go back at 02:00
    assert window.policy_seconds(spring) == 23 * 3600
    assert window.policy_seconds(autumn) == 25 * 3600
    _, start, end, _ = window.boundaries(spring)
    assert start == ms(datetime(2026, 3, 8, tzinfo=zone))
    assert end == ms(datetime(2026, 3, 9, tzinfo=zone))


def test_a_midnight_that_does_not_exist_starts_the_day_after_the_gap() -> None:
    # Santiago moved its clocks from 00:00 to 01:00 on 2024-09-08.
    zone = ZoneInfo("America/Santiago")
    now = ms(datetime(2024, 9, 8, 12, tzinfo=zone))
    _, start, _, _ = Window.calendar(Period.DAY, "America/Santiago").boundaries(now)
    assert datetime.fromtimestamp(start / 1000, zone).hour == 1
    assert datetime.fromtimestamp((start - 1) / 1000, zone).day == 7


# -- limits -------------------------------------------------------------------------------
def test_a_limit_applies_to_the_models_its_glob_matches() -> None:
    limit = Limit(Scope.GLOBAL, Metric.TOKENS, 1000, Window.sliding(60), model="gpt-4o*")
    assert limit.applies_to("gpt-4o")
    assert limit.applies_to("gpt-4o-mini")
    assert not limit.applies_to("gpt-4")
    assert Limit(Scope.USER, Metric.TOKENS, 1, Window.sliding(60)).applies_to("anything")


def test_limit_keys_follow_what_is_counted_not_the_budget() -> None:
    hour = Window.sliding(3600)
    a = Limit(Scope.USER, Metric.TOKENS, 1000, hour)
    assert a.key == Limit(Scope.USER, Metric.TOKENS, 5000, hour).key
    assert a.key != Limit(Scope.USER, Metric.COST, 1000, hour).key
    assert a.key != Limit(Scope.USER, Metric.TOKENS, 1000, Window.sliding(3600, 30)).key
    assert a.key != Limit(Scope.USER, Metric.TOKENS, 1000, hour, model="gpt-4o*").key
    assert len(a.key) < 20


def test_limit_names_say_scope_metric_window_and_model() -> None:
    assert Limit(Scope.USER, Metric.TOKENS, 1, Window.sliding(3600)).name == "tokens-hour"
    team = Limit(Scope.TEAM, Metric.REQUESTS, 1, Window.sliding(60))
    assert team.name == "team-requests-minute"
    cost = Limit(Scope.USER, Metric.COST, 1, Window.calendar(Period.MONTH))
    assert cost.name == "cost-month"
    model = Limit(Scope.GLOBAL, Metric.TOKENS, 1, Window.sliding(60), model="gpt-4o*")
    assert model.name == "global-tokens-minute-gpt-4o*"


# -- globs --------------------------------------------------------------------------------
def test_glob_matching_is_case_sensitive_and_blank_matches_all() -> None:
    assert glob_matches("", "x")
    assert glob_matches("gpt-?o", "gpt-4o")
    assert not glob_matches("GPT*", "gpt-4")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("gpt-4o*", "gpt-4o-mini*", True),
        ("gpt-4o*", "claude*", False),
        ("*-mini", "gpt-*", True),
        ("*a", "*b", False),
        ("*a*", "*b*", True),
        ("gpt-?", "gpt-4o", False),
        ("gpt-?o", "gpt-4?", True),
        ("a*b*c", "a*c", True),
        ("abc", "a*d", False),
        ("", "anything", True),
    ],
)
def test_glob_overlap(a: str, b: str, overlap: bool) -> None:
    assert globs_overlap(a, b) is overlap
    assert globs_overlap(b, a) is overlap


def test_specificity_prefers_exact_names_then_longer_globs() -> None:
    order = sorted(["*", "gpt-4o*", "gpt-4o", "gpt-4o-mini*", ""], key=specificity)
    assert order == ["", "*", "gpt-4o*", "gpt-4o-mini*", "gpt-4o"]


def test_glob_errors() -> None:
    assert glob_error("gpt-4o*") is None
    assert "[...]" in (glob_error("gpt-[45]") or "")
    assert "control" in (glob_error("gpt\n") or "")
    assert "at most" in (glob_error("x" * 201) or "")


# -- prices -------------------------------------------------------------------------------
def test_cost_is_micro_dollars_rounded_up() -> None:
    # $2.50 / 1M input, $10 / 1M output: 1000 + 500 tokens = 2500 + 5000 micro-dollars.
    assert cost_micros(1000, 500, Decimal("2.50"), Decimal("10")) == 7500
    assert cost_micros(1, 0, Decimal("0.15"), Decimal("0.60")) == 1  # 0.15 rounds up
    assert cost_micros(0, 0, Decimal("5"), Decimal("15")) == 0


def test_the_most_specific_price_wins_and_unknown_models_pay_the_most() -> None:
    table = PriceTable(
        [
            Price("gpt-4o*", Decimal("2.50"), Decimal("10")),
            Price("gpt-4o-mini*", Decimal("0.15"), Decimal("0.60")),
            Price("claude-3-opus", Decimal("15"), Decimal("75")),
        ]
    )
    assert table.price_for("gpt-4o-mini-2024")[0].input_per_million == Decimal("0.15")
    assert table.price_for("gpt-4o")[0].output_per_million == Decimal("10")
    price, listed = table.price_for("some-new-model")
    assert not listed
    assert (price.input_per_million, price.output_per_million) == (Decimal(15), Decimal(75))


def test_a_price_survives_its_encoding() -> None:
    price = Price("m", Decimal("0.15"), Decimal("1.2"))
    assert Price.decode(price.encode(), "m") == price
