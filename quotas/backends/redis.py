"""The Redis store of the sliding windows. Framework-free: give it a ``redis.Redis`` client.

Every operation is one Lua script, one round trip, atomic. Every Redis error is raised as
``quotas.exceptions.StoreUnavailable``, so the failure policy is decided in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from quotas.core.types import Limits, ReserveResult, SettleResult, Snapshot, WindowSpec
from quotas.exceptions import StoreUnavailable

__all__ = ["LedgerEntry", "RedisWindowStore", "WindowContents"]

T = TypeVar("T")
KEY_SUFFIXES = ("w", "q", "p", "r", "x")
SETTLE_FIGURES = frozenset(
    ("status", "prompt_tokens", "completion_tokens", "estimate", "reserved_at_ms", "model")
)


@cache
def script_source(name: str) -> str:
    """The script's text with the shared helpers prepended (read once per process)."""
    lua = resources.files("quotas.backends") / "lua"
    return (lua / "_window.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@cache
def script_sha(name: str) -> str:
    """The SHA1 Redis knows the script by (``EVALSHA``)."""
    return hashlib.sha1(script_source(name).encode()).hexdigest()


class ScriptRunner:
    """Runs the store's scripts, each thread on a connection of its own.

    A script call is the hot path of every request, so it skips what redis-py's generic
    command path does around each command and that a script call does not need: taking a
    connection from the pool and polling it for stray data (one system call more), giving
    it back, retry and metrics bookkeeping. On a VM where a system call is expensive that
    halves the client's cost of a round trip. What it keeps:

    - the client's connection settings (host, timeouts, TLS, credentials): connections are
      made by the client's pool class from the pool's arguments;
    - a connection that failed (refused, reset, timed out mid-reply) is closed and the next
      call makes a new one; an error from the script itself (``ResponseError``) leaves it
      usable; ``NOSCRIPT`` (Redis restarted or flushed its scripts) sends the source once;
    - a connection used before that turns out closed (the server restarted or dropped idle
      clients: ``ConnectionError``) is replaced and the call sent once more, at once. That is
      the case redis-py's pool checks for by polling every connection it lends; here it
      costs nothing until it happens. A timeout is never retried: the call may have run;
    - a forked child never writes to its parent's socket: it makes its own connection;
    - a thread's connection is closed when the thread ends (it lives in thread-local
      storage, and redis-py closes a connection when it is collected).

    A client without one connection pool (Redis Cluster) runs the scripts through redis-py.
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.pool = getattr(client, "connection_pool", None)
        self._local = threading.local()
        self._scripts: dict[str, Any] = {}

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; ``StoreUnavailable`` on any Redis or socket error."""
        if self.pool is None:
            return self._run_with_client(name, keys, args)
        return self._on_connection(lambda connection: self._call(connection, name, keys, args))

    def run_many(self, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list:
        """Each ``(keys, args)`` call's reply, in order, from one round trip (a pipeline);
        a call whose script failed gets its ``ResponseError`` in place of a reply, and
        ``StoreUnavailable`` is raised when Redis cannot be reached.

        Only for calls that change nothing when sent twice: after a closed connection the
        whole pipeline is sent again.
        """
        if not calls:
            return []
        if self.pool is None:
            return [self._run_with_client(name, keys, args) for keys, args in calls]
        return self._on_connection(lambda connection: self._pipeline(connection, name, calls))

    def _on_connection(self, send: Callable[[Any], T]) -> T:
        connection = self._connection()
        reused = _is_connected(connection)
        try:
            try:
                return send(connection)
            except RedisConnectionError:
                if not reused:
                    raise
                connection.disconnect()  # closed while idle: once more, on a new connection
                return send(connection)
        except ResponseError as exc:  # the script failed; the connection is in step
            raise StoreUnavailable(f"Redis error: {exc}") from exc
        except (RedisError, OSError) as exc:
            self._drop(connection)
            raise StoreUnavailable(f"Redis error: {exc}") from exc
        except BaseException:  # interrupted mid-call: the reply may still be on its way
            self._drop(connection)
            raise

    @staticmethod
    def _call(connection: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            command = ("EVALSHA", script_sha(name), len(keys), *keys, *args)
            connection.send_packed_command(_pack(connection, command), check_health=False)
            return connection.read_response()
        except NoScriptError:
            command = ("EVAL", script_source(name), len(keys), *keys, *args)
            connection.send_packed_command(_pack(connection, command), check_health=False)
            return connection.read_response()

    @staticmethod
    def _pipeline(
        connection: Any, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list:
        commands = [("EVALSHA", script_sha(name), len(keys), *keys, *args) for keys, args in calls]
        replies = _send_all(connection, commands)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:  # those never ran: send them with the source (which loads it)
            source = script_source(name)
            again = _send_all(connection, [("EVAL", source, *commands[i][2:]) for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        return replies

    def _connection(self) -> Any:
        local = self._local
        connection = getattr(local, "connection", None)
        pid = os.getpid()
        if connection is None or local.pid != pid:
            assert self.pool is not None
            connection = self.pool.connection_class(**self.pool.connection_kwargs)
            local.connection, local.pid = connection, pid
        return connection

    @staticmethod
    def _drop(connection: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken socket
            connection.disconnect()

    def _run_with_client(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(script_source(name))
        try:
            return script(keys=keys, args=args)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc


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
        self.scripts = ScriptRunner(client)

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
        return [*self.keys(scope), marker], args

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


def _hiredis_packing() -> tuple[Any, Any]:
    """hiredis's packer, and the redis-py serializer that does nothing but call it."""
    try:
        from hiredis import pack_command
        from redis.connection import HiredisRespSerializer
    except ImportError:  # no hiredis, or a redis-py without that serializer
        return None, None
    return pack_command, HiredisRespSerializer


_HIREDIS_PACK, _HIREDIS_SERIALIZER = _hiredis_packing()


def _pack(connection: Any, command: tuple[Any, ...]) -> list[bytes]:
    """One command in the Redis protocol, as ``send_packed_command`` takes it: by hiredis
    directly when the connection packs with it anyway (the same bytes without redis-py's
    pass over every argument, about 4 µs less a call), else by the connection."""
    packer = getattr(connection, "_command_packer", None)
    if _HIREDIS_PACK is not None and isinstance(packer, _HIREDIS_SERIALIZER):
        return [_HIREDIS_PACK(command)]
    packed: list[bytes] = connection.pack_command(*command)
    return packed


def _send_all(connection: Any, commands: Sequence[Sequence[Any]]) -> list:
    """Send every command in one write; read every reply (a failed command's error in its
    place: the later replies are still on the connection and must be read)."""
    connection.send_packed_command(connection.pack_commands(commands), check_health=False)
    replies: list = []
    for _ in commands:
        try:
            replies.append(connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def _is_connected(connection: Any) -> bool:
    """True while the connection holds an open socket. redis-py 8 says so itself
    (``is_connected``); the versions before it keep the socket in ``_sock``."""
    connected = getattr(connection, "is_connected", None)
    return bool(connected) if connected is not None else connection._sock is not None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
