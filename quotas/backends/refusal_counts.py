"""Refusals (429s) counted per hour in Redis, for the usage rollups: one hash per hour,
``<prefix>:refusals:<hour start, ms>``, whose fields name who was refused by which limit and
whose values count the refusals. Framework-free; the engine batches the increments and
copies each hour's counts into the rollups (``quotas.engine.refusals``)."""

from __future__ import annotations

from collections.abc import Mapping

from redis import Redis
from redis.exceptions import RedisError

from quotas.backends.records import as_text
from quotas.exceptions import StoreUnavailable

__all__ = ["add_refusals", "refusal_counts", "refusals_key"]


def refusals_key(prefix: str, hour_ms: int) -> str:
    """The hash of one hour's refusals (``hour_ms``: the hour's start, in ms)."""
    return f"{prefix}:refusals:{hour_ms}"


def add_refusals(
    client: Redis, prefix: str, counts: Mapping[tuple[int, str], int], keep_seconds: int
) -> None:
    """Add ``counts`` (``(hour_ms, field)``: refusals) in one pipelined round trip; each
    hour's hash expires ``keep_seconds`` after its last increment."""
    if not counts:
        return
    pipe = client.pipeline(transaction=False)
    for (hour_ms, name), count in counts.items():
        pipe.hincrby(refusals_key(prefix, hour_ms), name, count)
    for hour_ms in {hour for hour, _ in counts}:
        pipe.expire(refusals_key(prefix, hour_ms), keep_seconds)
    try:
        pipe.execute()
    except RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from exc


def refusal_counts(client: Redis, prefix: str, hour_ms: int) -> dict[str, int]:
    """One hour's refusals: field to count."""
    try:
        raw = client.hgetall(refusals_key(prefix, hour_ms))
    except RedisError as exc:
        raise StoreUnavailable(f"Redis error: {exc}") from exc
    return {as_text(name): int(count) for name, count in raw.items()}
