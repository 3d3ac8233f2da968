"""The Redis store of the sliding windows. Framework-free: give it a ``redis.Redis`` client.

Every operation is one Lua script, one round trip, atomic. Every Redis error is raised as
``quotas.exceptions.StoreUnavailable``, so the failure policy is decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeVar

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import RedisError

from quotas.core.types import Limits, ReserveResult, SettleResult, Snapshot, WindowSpec
from quotas.exceptions import StoreUnavailable

__all__ = ["LedgerEntry", "RedisWindowStore", "WindowContents"]

T = TypeVar("T")
KEY_SUFFIXES = ("w", "q", "p", "r", "x")


@cache
def script_source(name: str) -> str:
    """The script's text with the shared helpers prepended (read once per process)."""
    lua = resources.files("quotas.backends") / "lua"
    return (lua / "_window.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass(frozen=True)
class LedgerEntry:
    """A reservation's ledger record, waiting in the outbox for its row: settled (``status``
    "settled", "refunded" or "degraded", with the actual usage) or "expired" (reached its TTL
    unsettled: charged at its estimate, ``settled_at_ms`` is ``None``)."""

    scope: str
    reservation_id: str
    status: str
    estimate: int
    actual: int
    reserved_at_ms: int
    settled_at_ms: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> LedgerEntry:
        """The entry of a ``services.usage_payload`` dict (what the Celery task receives)."""
        return cls(
            scope=str(payload["scope"]),
            reservation_id=str(payload["request_id"]),
            status=str(payload["status"]),
            estimate=int(payload["estimated_tokens"]),
            actual=int(payload["actual_tokens"]),
            reserved_at_ms=int(payload["reserved_at_ms"]),
            settled_at_ms=payload.get("settled_at_ms"),
            prompt_tokens=payload.get("prompt_tokens"),
            completion_tokens=payload.get("completion_tokens"),
            model=str(payload.get("model") or ""),
        )

    @classmethod
    def parse(cls, scope: str, rid: bytes | str, rec: bytes | str) -> LedgerEntry:
        """Read an outbox record as ``settle.lua`` or ``expire.lua`` wrote it."""
        text = _text(rec)
        if text.startswith("s:"):
            _, estimate, actual, reserved_at, settled_at, prompt, completion, status, model = (
                text.split(":", 8)
            )
            return cls(
                scope,
                _text(rid),
                status,
                int(estimate),
                int(actual),
                int(reserved_at),
                int(settled_at),
                int(prompt) if prompt else None,
                int(completion) if completion else None,
                model,
            )
        _bucket, estimate, reserved_at, model = text.split(":", 3)
        tokens = int(estimate)
        return cls(scope, _text(rid), "expired", tokens, tokens, int(reserved_at), model=model)


@dataclass(frozen=True)
class WindowContents:
    """One consistent read of a token window, for the audit.

    ``epoch`` is empty when the window was never built or was lost (nothing else is read).
    ``buckets`` maps bucket index to tokens (non-empty live buckets only); ``pending`` maps
    reservation ids to ``(bucket index, estimate)``; ``outbox`` holds the ledger records not
    yet written as rows.
    """

    epoch: str
    now_ms: int
    first_bucket: int
    current_bucket: int
    buckets: dict[int, int]
    pending: dict[str, tuple[int, int]]
    outbox: list[LedgerEntry]
    reset_ms: int = 0


class RedisWindowStore:
    """Sliding-window token and request budgets, one hash of buckets per quota key."""

    def __init__(self, client: Redis, *, prefix: str, spec: WindowSpec) -> None:
        self.client = client
        self.prefix = prefix
        self.spec = spec
        self._scripts: dict[str, Script] = {}

    # -- keys ----------------------------------------------------------------------------
    def keys(self, scope: str) -> list[str]:
        """All keys of one quota key; the ``{hash tag}`` keeps them in one cluster slot."""
        return [f"{self.prefix}:{{{scope}}}:{suffix}" for suffix in KEY_SUFFIXES]

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
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(script_source(name))
        keys = [*self.keys(scope), *extra_keys]
        return self._call(script, keys=keys, args=[*self._common(now_ms), *args])

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # -- operations ----------------------------------------------------------------------
    def reserve(
        self,
        scope: str,
        reservation_id: str,
        tokens: int,
        *,
        ttl_ms: int,
        limits: Limits | None = None,
        epoch: str = "",
        model: str = "",
        add_default_output: bool = False,
        seed: Sequence[tuple[int, int]] = (),
        now_ms: int | None = None,
    ) -> ReserveResult:
        """Charge ``tokens`` (and one request) if every limit allows; else charge nothing.

        Without ``limits`` the stored ones are used; when none are stored the result's status
        is ``NEEDS_CONFIG`` and the caller retries with ``limits`` (plus ``epoch`` and ``seed``
        when ``window_has_epoch`` is false: the window must be rebuilt from the ledger).
        ``add_default_output`` adds the plan's default output allowance to ``tokens`` (the
        request named no ``max_tokens``); the result's ``tokens`` is what was requested.
        """
        cfg = limits.encode() if limits else ""
        pairs = [value for pair in seed for value in pair]
        raw = self._run(
            "reserve",
            scope,
            [
                reservation_id,
                int(tokens),
                ttl_ms,
                cfg,
                epoch,
                model,
                "1" if add_default_output else "0",
                *pairs,
            ],
            now_ms,
        )
        return ReserveResult.from_script(raw)

    def settle(
        self,
        scope: str,
        reservation_id: str,
        actual_tokens: int | None,
        *,
        epoch: str,
        status: str = "settled",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        estimate: int = 0,
        reserved_at_ms: int = 0,
        model: str = "",
        now_ms: int | None = None,
    ) -> SettleResult:
        """Apply ``actual - estimate`` to the reservation's bucket and put its ledger record
        (``status``, the token figures) in the outbox, atomically; idempotent by id.

        ``actual_tokens=None`` keeps the estimate. ``epoch=""`` (settling by id alone) never
        charges a reservation Redis no longer knows. ``estimate``, ``reserved_at_ms`` and
        ``model`` are the caller's figures, recorded when Redis no longer knows the
        reservation (Redis's own figures win when it does).
        """
        actual = -1 if actual_tokens is None else int(actual_tokens)
        marker = f"{self.prefix}:{{{scope}}}:s:{reservation_id}"
        args = [
            reservation_id,
            actual,
            epoch,
            status,
            "" if prompt_tokens is None else int(prompt_tokens),
            "" if completion_tokens is None else int(completion_tokens),
            int(estimate),
            int(reserved_at_ms),
            model,
        ]
        raw = self._run("settle", scope, args, now_ms, [marker])
        return SettleResult.from_script(raw)

    def peek(
        self,
        scope: str,
        *,
        limits: Limits | None = None,
        epoch: str = "",
        seed: Sequence[tuple[int, int]] = (),
        now_ms: int | None = None,
    ) -> Snapshot | bool:
        """The budget snapshot, or whether the window has an epoch when no config is stored."""
        cfg = limits.encode() if limits else ""
        pairs = [value for pair in seed for value in pair]
        raw = self._run("peek", scope, [cfg, epoch, *pairs], now_ms)
        if int(raw[0]) == -1:
            return bool(int(raw[1]))
        return Snapshot.from_script(raw)

    def expire(self, scope: str, *, batch: int = 500, now_ms: int | None = None) -> int:
        """Move up to ``batch`` reservations past their deadline to the outbox; return how many
        overdue ids it took (``batch``: call again, there may be more)."""
        return int(self._run("expire", scope, [batch], now_ms))

    def outbox(self, scope: str, *, batch: int = 500) -> list[LedgerEntry]:
        """Up to about ``batch`` ledger records whose rows are not yet acknowledged."""
        key = self.keys(scope)[4]
        entries: list[LedgerEntry] = []
        cursor = 0
        while True:
            reply: Any = self._call(self.client.hscan, key, cursor, count=batch)
            cursor, records = int(reply[0]), reply[1]
            entries += [LedgerEntry.parse(scope, rid, rec) for rid, rec in records.items()]
            if not cursor or len(entries) >= batch:
                return entries

    def ack_outbox(self, scope: str, reservation_ids: Sequence[str]) -> None:
        """Forget outbox records once their ledger rows are written."""
        if reservation_ids:
            self._call(self.client.hdel, self.keys(scope)[4], *reservation_ids)

    def window_contents(self, scope: str, *, now_ms: int | None = None) -> WindowContents:
        """The live buckets, pending reservations and outbox of one quota key, read at once."""
        raw = self._run("buckets", scope, [], now_ms)
        return WindowContents(
            epoch=_text(raw[0]),
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

    def reset(self, scope: str) -> None:
        """Give the whole budget back now (keeps the epoch and the stored limits)."""
        self._run("reset", scope, [], None)

    def forget_limits(self, scopes: Sequence[str]) -> None:
        """Drop stored limits so the next request reloads them from the database."""
        pipe = self.client.pipeline(transaction=False)
        for scope in scopes:
            pipe.hdel(self.keys(scope)[0], "cfg")
        self._call(pipe.execute)

    def forget_all_limits(self, batch: int = 1000) -> int:
        """Drop the stored limits of every quota key (a plan changed). Returns the keys seen."""
        seen = 0
        for chunk in self._chunks(self.iter_window_keys(), batch):
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hdel(key, "cfg")
            self._call(pipe.execute)
            seen += len(chunk)
        return seen

    def iter_window_keys(self) -> Iterator[str]:
        """Every token window hash, by SCAN (never KEYS): for background jobs only."""
        pattern = f"{self.prefix}:{{*}}:w"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000, _type="HASH"):
                yield key.decode() if isinstance(key, bytes) else key
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def iter_scopes(self, suffix: str) -> Iterator[str]:
        """Quota keys that have a key with this suffix (e.g. ``"p"``: pending reservations)."""
        start, end = len(self.prefix) + 2, -(len(suffix) + 2)
        pattern = f"{self.prefix}:{{*}}:{suffix}"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000):
                text = key.decode() if isinstance(key, bytes) else key
                yield text[start:end]
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def memory_usage(self, scope: str) -> int:
        """Bytes Redis uses for every key of one quota key (``MEMORY USAGE``)."""
        total = 0
        for key in self.keys(scope):
            total += self._call(self.client.memory_usage, key, samples=0) or 0
        return total

    @staticmethod
    def _held(flat: Sequence[bytes | str]) -> dict[str, tuple[int, int]]:
        held = {}
        for rid, rec in zip(flat[::2], flat[1::2], strict=True):
            bucket, estimate, _ = _text(rec).split(":", 2)
            held[_text(rid)] = (int(bucket), int(estimate))
        return held

    @staticmethod
    def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
        chunk: list[str] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
