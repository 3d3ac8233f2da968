"""The Redis store of the sliding windows. Framework-free: give it a ``redis.Redis`` client.

Every operation is one Lua script, one round trip, atomic. Every Redis error is raised as
``quotas.exceptions.StoreUnavailable``, so the failure policy is decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import RedisError

from quotas.backends.outbox import LedgerOutbox
from quotas.backends.records import LedgerEntry, WindowContents, as_text
from quotas.backends.scripts import ScriptRunner
from quotas.core.types import Limits, ReserveResult, SettleResult, Snapshot, WindowSpec
from quotas.exceptions import StoreUnavailable

__all__ = ["LedgerEntry", "RedisWindowStore", "ScriptRunner", "WindowContents"]

T = TypeVar("T")
KEY_SUFFIXES = ("w", "q", "p", "r", "x")
SETTLE_FIGURES = frozenset(
    ("status", "prompt_tokens", "completion_tokens", "estimate", "reserved_at_ms", "model")
)


class RedisWindowStore(LedgerOutbox):
    """Sliding-window token and request budgets, one hash of buckets per quota key."""

    def __init__(self, client: Redis, *, prefix: str, spec: WindowSpec) -> None:
        self.client = client
        self.prefix = prefix
        self.spec = spec
        self.scripts = ScriptRunner(client)

    # -- keys ----------------------------------------------------------------------------
    def keys(self, scope: str) -> list[str]:
        """All keys of one quota key; the ``{hash tag}`` keeps them in one cluster slot."""
        return [f"{self.prefix}:{{{scope}}}:{suffix}" for suffix in KEY_SUFFIXES]

    def scope_of(self, key: bytes | str, suffix: str) -> str:
        """The quota key of one of its Redis keys (``<prefix>:{<scope>}:<suffix>``)."""
        return as_text(key)[len(self.prefix) + 2 : -(len(suffix) + 2)]

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
        keys = [*self.keys(scope), *extra_keys]
        return self.scripts.run(name, keys, [*self._common(now_ms), *args])

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
        attempts_limit: int = 0,
        now_ms: int | None = None,
    ) -> ReserveResult:
        """Charge ``tokens`` (and one request) if every limit allows; else charge nothing.

        Without ``limits`` the stored ones are used; when none are stored the result's status
        is ``NEEDS_CONFIG`` and the caller retries with ``limits`` (plus ``epoch`` and ``seed``
        when ``window_has_epoch`` is false: the window must be rebuilt from the ledger).
        ``add_default_output`` adds the plan's default output allowance to ``tokens`` (the
        request named no ``max_tokens``); the result's ``tokens`` is what was requested.
        ``attempts_limit`` (0: none) refuses a client with that many rejected attempts in
        the request window (``OVER_ATTEMPTS``), and counts a 413 as one more.
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
                int(attempts_limit),
                *pairs,
            ],
            now_ms,
            extra_keys=[self.attempts_key(scope), self.due_key],
        )
        return ReserveResult.from_script(raw)

    def attempts_key(self, scope: str) -> str:
        """The window of one quota key's rejected attempts (400s and 413s)."""
        return f"{self.prefix}:{{{scope}}}:a"

    def record_attempt(self, scope: str, limit: int, *, now_ms: int | None = None) -> float:
        """Count one rejected attempt; return the seconds the client is now refused for (0
        while it is under ``limit`` attempts in the request window)."""
        keys, args = [self.attempts_key(scope)], [*self._common(now_ms), int(limit)]
        _, blocked_ms = self.scripts.run("attempt", keys, args)
        return max(int(blocked_ms), 0) / 1000

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
        keys, args = self._settle_call(
            scope,
            reservation_id,
            actual_tokens,
            epoch=epoch,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            estimate=estimate,
            reserved_at_ms=reserved_at_ms,
            model=model,
            now_ms=now_ms,
        )
        return SettleResult.from_script(self.scripts.run("settle", keys, args))

    def settle_many(
        self, settles: Sequence[dict[str, Any]]
    ) -> list[SettleResult | StoreUnavailable]:
        """Several settles in one round trip: each dict holds ``settle``'s arguments by name.

        Each settle is atomic and idempotent on its own, as ``settle`` is; one whose script
        failed gets a ``StoreUnavailable`` in its place. ``StoreUnavailable`` is raised when
        Redis cannot be reached (none, some or all may then have been applied: settling again
        is safe).
        """
        replies = self.scripts.run_many("settle", [self._settle_call(**s) for s in settles])
        return [
            StoreUnavailable(f"Redis error: {reply}")
            if isinstance(reply, Exception)
            else SettleResult.from_script(reply)
            for reply in replies
        ]

    def _settle_call(
        self,
        scope: str,
        reservation_id: str,
        actual_tokens: int | None,
        *,
        epoch: str,
        now_ms: int | None = None,
        **figures: Any,
    ) -> tuple[list[str], list[Any]]:
        """Keys and arguments of one settle script call (``figures``: ``settle``'s other
        keyword arguments)."""
        unknown = set(figures) - SETTLE_FIGURES
        if unknown:
            raise TypeError(f"Unknown settle arguments: {sorted(unknown)}")
        prompt, completion = figures.get("prompt_tokens"), figures.get("completion_tokens")
        marker = f"{self.prefix}:{{{scope}}}:s:{reservation_id}"
        args = [
            *self._common(now_ms),
            reservation_id,
            -1 if actual_tokens is None else int(actual_tokens),
            epoch,
            figures.get("status", "settled"),
            "" if prompt is None else int(prompt),
            "" if completion is None else int(completion),
            int(figures.get("estimate", 0)),
            int(figures.get("reserved_at_ms", 0)),
            figures.get("model", ""),
        ]
        return [*self.keys(scope), marker, self.backlog_key, self.due_key], args

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
        keys = [self.backlog_key, self.due_key]
        return int(self._run("expire", scope, [batch], now_ms, extra_keys=keys))

    def window_contents(self, scope: str, *, now_ms: int | None = None) -> WindowContents:
        """The live buckets, pending reservations and outbox of one quota key, read at once."""
        raw = self._run("buckets", scope, [], now_ms)
        return WindowContents(
            epoch=as_text(raw[0]),
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
        pattern = f"{_glob_escape(self.prefix)}:{{*}}:w"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000, _type="HASH"):
                yield key.decode() if isinstance(key, bytes) else key
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def iter_scopes(self, suffix: str) -> Iterator[str]:
        """Quota keys that have a key with this suffix (e.g. ``"p"``: pending reservations)."""
        pattern = f"{_glob_escape(self.prefix)}:{{*}}:{suffix}"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000):
                yield self.scope_of(key, suffix)
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
            bucket, estimate, _ = as_text(rec).split(":", 2)
            held[as_text(rid)] = (int(bucket), int(estimate))
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


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a ``SCAN MATCH`` pattern (a cache prefix may hold any
    character)."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
