"""Limits of the layered quota model. Framework-free.

A request is decided against every ``Limit`` that applies to it, all or nothing. A limit is
a budget of one *metric* (tokens, requests, or cost in micro-dollars) over one *window*
(sliding, of any length, in buckets; or a calendar day or month in a time zone), for one
*scope* (the user, the user's team, or all traffic together), optionally for the models a
glob matches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache, cached_property
from zoneinfo import ZoneInfo

from quotas.core.globs import glob_matches

__all__ = ["Limit", "Metric", "Period", "Scope", "Window"]

DAY_MS = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Metric(StrEnum):
    TOKENS = "tokens"
    REQUESTS = "requests"
    COST = "cost"  # micro-dollars (1e-6 USD)


class Scope(StrEnum):
    USER = "user"
    TEAM = "team"
    GLOBAL = "global"


class Period(StrEnum):
    SLIDING = "sliding"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class Window:
    """A sliding window (``seconds`` long, in buckets of ``bucket_seconds``) or a calendar
    period (a day or a month in ``time_zone``) that resets exactly at its boundary."""

    period: Period = Period.SLIDING
    seconds: float = 3600
    bucket_seconds: float = 60
    time_zone: str = "UTC"

    @classmethod
    def sliding(cls, seconds: float, bucket_seconds: float | None = None) -> Window:
        """A sliding window; by default in 60 buckets (a minute in seconds, an hour in
        minutes, a day in 24-minute buckets), or the fewest above 60 that cut it into whole
        milliseconds (at most 100: a window is whole milliseconds)."""
        if bucket_seconds:
            return cls(Period.SLIDING, seconds, bucket_seconds)
        window_ms = round(seconds * 1000)
        count = next((n for n in range(60, 101) if window_ms % n == 0), 0)
        return cls(Period.SLIDING, seconds, window_ms / count / 1000 if count else 0)

    @classmethod
    def calendar(cls, period: Period, time_zone: str = "UTC") -> Window:
        return cls(period, 0, 0, time_zone)

    def __post_init__(self) -> None:
        error = self.error()
        if error:
            raise ValueError(error)

    def error(self) -> str | None:
        """Why this window is unusable, or ``None``."""
        if self.period is not Period.SLIDING:
            return None if _zone(self.time_zone) else f"Unknown time zone {self.time_zone!r}."
        window_ms, bucket_ms = self.window_ms, self.bucket_ms
        if bucket_ms <= 0 or window_ms < bucket_ms or window_ms % bucket_ms:
            return (
                f"A window of {self.seconds:g} s must be a positive multiple of its bucket "
                f"({self.bucket_seconds:g} s)."
            )
        if window_ms // bucket_ms > 1000:
            return f"A window may have at most 1000 buckets ({window_ms // bucket_ms} asked)."
        return None

    @cached_property
    def is_sliding(self) -> bool:
        return self.period is Period.SLIDING

    @cached_property
    def window_ms(self) -> int:
        return round(self.seconds * 1000)

    @cached_property
    def bucket_ms(self) -> int:
        return round(self.bucket_seconds * 1000)

    @cached_property
    def name(self) -> str:
        """A short name for policies and messages: ``minute``, ``hour``, ``24h``, ``day``
        (a calendar day), ``month``."""
        if not self.is_sliding:
            return self.period.value
        seconds = round(self.seconds)
        named = {60: "minute", 3600: "hour"}
        if seconds in named and seconds == self.seconds:
            return named[seconds]
        for unit, letter in ((86_400, "d"), (3600, "h"), (60, "m")):
            if seconds % unit == 0 and seconds == self.seconds:
                return f"{seconds // unit}{letter}"
        return f"{self.seconds:g}s"

    @cached_property
    def code(self) -> str:
        """What makes two windows count the same way (part of a limit's Redis key)."""
        if self.is_sliding:
            return f"s{self.window_ms}.{self.bucket_ms}"
        return f"{self.period.value[0]}.{self.time_zone}"

    def boundaries(self, now_ms: int) -> tuple[int, int, int, int]:
        """Four consecutive period boundaries (ms, UTC) around ``now_ms``: the period before
        the current one starts at the first, the current one spans the second and third,
        the next ends at the fourth. The Redis script picks the period that holds the
        server's own clock, so app servers with skewed clocks still agree. (Remembered for
        as long as ``now_ms`` stays in the same period: this is on every request's path.)"""
        known = _periods.get((self.period, self.time_zone))
        if known is not None and known[1] <= now_ms < known[2]:
            return known
        found = self._boundaries(now_ms)
        _periods[(self.period, self.time_zone)] = found
        return found

    def _boundaries(self, now_ms: int) -> tuple[int, int, int, int]:
        zone = _zone(self.time_zone)
        assert zone is not None and not self.is_sliding
        local = (EPOCH + timedelta(milliseconds=now_ms)).astimezone(zone)
        start = _period_start(self.period, local.replace(tzinfo=None))
        previous = _shift(self.period, start, -1)
        following = _shift(self.period, start, 1)
        after = _shift(self.period, start, 2)
        return tuple(_utc_ms(moment, zone) for moment in (previous, start, following, after))  # type: ignore[return-value]

    def policy_seconds(self, now_ms: int) -> int:
        """The window's length in whole seconds, for ``RateLimit-Policy``'s ``w`` (a
        calendar period's current length)."""
        if self.is_sliding:
            return max(round(self.seconds), 1)
        _, start, end, _ = self.boundaries(now_ms)
        return (end - start) // 1000


@dataclass(frozen=True)
class Limit:
    """One budget: ``budget`` units of ``metric`` per ``window`` for ``scope``, counted only
    for the models ``model`` matches (blank: every model). ``origin`` says where it comes
    from (``plan:pro``, ``team:acme``, ``global:provider``), for messages and the admin."""

    scope: Scope
    metric: Metric
    budget: int
    window: Window
    model: str = ""
    origin: str = field(default="", compare=False)
    # The counter's fixed name, for the plan's own two limits: "w" (tokens per
    # WINDOW_SECONDS, the window of earlier versions) and "q" (requests per minute).
    counter: str = ""

    def applies_to(self, model: str) -> bool:
        return glob_matches(self.model, model)

    @cached_property
    def key(self) -> str:
        """The Redis key suffix of this limit's counter within its scope. Two limits that
        count the same way share it; a change of window makes a new counter, rebuilt from
        the ledger. The budget is not part of it: raising a budget keeps the usage."""
        if self.counter:
            return self.counter
        return _limit_key(self.metric.value, self.window.code, self.model)

    @cached_property
    def name(self) -> str:
        """A policy name: ``tokens-hour``, ``team-requests-minute``,
        ``global-tokens-minute-gpt-4o*``."""
        parts = [] if self.scope is Scope.USER else [self.scope.value]
        parts += [self.metric.value, self.window.name]
        if self.model:
            parts.append(self.model)
        return "-".join(parts)


# The last boundaries computed per (period, time zone): a handful of entries per process.
_periods: dict[tuple[Period, str], tuple[int, int, int, int]] = {}


@cache
def _limit_key(metric: str, window_code: str, model: str) -> str:
    digest = hashlib.sha1(f"{window_code}|{model}".encode()).hexdigest()[:10]
    return f"l.{metric[0]}.{digest}"


@cache
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # unknown, malformed, or no tz database
        return None


def _period_start(period: Period, local: datetime) -> datetime:
    if period is Period.DAY:
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _shift(period: Period, start: datetime, count: int) -> datetime:
    if period is Period.DAY:
        return start + timedelta(days=count)
    month = start.month - 1 + count
    return start.replace(year=start.year + month // 12, month=month % 12 + 1)


def _utc_ms(local: datetime, zone: ZoneInfo) -> int:
    """A wall-clock moment in ``zone`` as ms since the Unix epoch. A midnight that does not
    exist (a DST jump at midnight) resolves, with ``fold=0``, to the first moment after the
    gap; a midnight that happens twice, to its first occurrence."""
    moment = local.replace(tzinfo=zone).astimezone(UTC)
    return (moment - EPOCH) // timedelta(milliseconds=1)
