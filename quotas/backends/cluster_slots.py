"""Redis Cluster's hash slots as the store uses them: which slot a hash tag lands in, a hash
tag for every slot, and the per-slot keys a cluster store keeps (the config version copies
and the ledger registries, reached through the set of slots in use, never by ``SCAN``).
Framework-free; see ``quotas.backends.cluster``."""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any, TypeVar

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from quotas.backends.redis import RedisWindowStore
from quotas.backends.scripts import ScriptRunner
from quotas.exceptions import StoreUnavailable

__all__ = ["CLUSTER_ERRORS", "ClusterScripts", "SlottedStore", "hash_slot", "slot_tag"]

T = TypeVar("T")
SLOTS = 16384
CLUSTER_ERRORS = (RedisError, RedisClusterException, OSError)


def hash_slot(tag: str) -> int:
    """The Redis Cluster hash slot of the keys under the hash tag ``{tag}``."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@cache
def _slot_tags() -> tuple[str, ...]:
    """For every hash slot, a short hash tag whose keys land in it (made once per process)."""
    tags: list[str] = [""] * SLOTS
    left, i = SLOTS, 0
    while left:
        tag = f"@{i:x}"
        slot = hash_slot(tag)
        if not tags[slot]:
            tags[slot] = tag
            left -= 1
        i += 1
    return tuple(tags)


def slot_tag(slot: int) -> str:
    """A hash tag whose keys live in ``slot``."""
    return _slot_tags()[slot]


# Replies of a node that no longer serves a slot, or not yet, or not for writes.
REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY")


class ClusterScripts(ScriptRunner):
    """Scripts on Redis Cluster: each call straight to the master of its keys' slot (as the
    client's slot table names it) through that node's own ``ScriptRunner``, the fast path of
    one Redis. A call that fails there (the slot moved: ``MOVED``; the node is down) goes
    once through redis-py's cluster client, which follows redirects and relearns the slot
    table. Every cluster error is raised as ``StoreUnavailable``."""

    client: Any  # a redis.cluster.RedisCluster

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.pool = None
        self._nodes: dict[str, ScriptRunner] = {}

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            runner = self._runner(keys[0])
        except CLUSTER_ERRORS:
            runner = None
        if runner is not None:
            try:
                return runner.run(name, keys, args)
            except StoreUnavailable as exc:
                if not _may_have_moved(exc):
                    raise
        try:
            return self._run_with_client(name, keys, args)
        except CLUSTER_ERRORS as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def _runner(self, key: str) -> ScriptRunner | None:
        node = self.client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        runner = self._nodes.get(node.name)
        if runner is None or runner.client is not node.redis_connection:
            if node.redis_connection is None:
                return None
            runner = self._nodes[node.name] = ScriptRunner(node.redis_connection)
        return runner

    def run_many(self, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list:
        return [self.run(name, keys, args) for keys, args in calls]


def _may_have_moved(exc: StoreUnavailable) -> bool:
    """Whether the cluster client could do better: anything but an error of the script
    itself (a redirect, a node that is down or changed role)."""
    cause = exc.__cause__
    if not isinstance(cause, ResponseError):
        return True
    moved = isinstance(cause, (AskError, TryAgainError, ClusterDownError, ReadOnlyError))
    return moved or str(cause).startswith(REDIRECTS)


class SlottedStore(RedisWindowStore):
    """The per-slot keys of a store on Redis Cluster (see the module docstring)."""

    client: Any  # a redis.cluster.RedisCluster

    def __init__(self, client: Any, *, prefix: str, spec: Any) -> None:
        super().__init__(client, prefix=prefix, spec=spec)
        self.scripts = ClusterScripts(client)
        self._slots_known: set[int] = set()

    # -- keys ----------------------------------------------------------------------------
    def slot_of(self, scope: str) -> int:
        return hash_slot(scope)

    def _slot_key(self, scope: str, name: str) -> str:
        return f"{self.prefix}:{{{slot_tag(self.slot_of(scope))}}}:{name}"

    def version_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "config:version")

    def backlog_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "ledger:backlog")

    def due_key_for(self, scope: str) -> str:
        return self._slot_key(scope, "ledger:due")

    @property
    def slots_key(self) -> str:
        """The set of hash slots whose registries and version copy may exist."""
        return f"{self.prefix}:ledger:slots"

    def breaker_key(self, scope: str) -> str:
        """The node serving ``scope``'s slot: a failing node opens its own breaker only."""
        try:
            node = self.client.nodes_manager.get_node_from_slot(self.slot_of(scope))
        except CLUSTER_ERRORS:
            return "?"
        return str(node.name)

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CLUSTER_ERRORS as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # -- slots in use and the config version ---------------------------------------------
    def _know_slot(self, scope: str, *, again: bool = False) -> None:
        """Note ``scope``'s slot in the slot set and give it the version copy (once per
        process and slot, before its first script: the sweep and ``bump_version`` then
        reach it)."""
        slot = self.slot_of(scope)
        if slot in self._slots_known and not again:
            return
        self._call(self.client.sadd, self.slots_key, slot)
        version = self.current_version()
        self._call(self.client.set, self.version_key_for(scope), version, nx=True)
        self._slots_known.add(slot)

    def _used_slots(self) -> list[int]:
        raw = self._call(self.client.smembers, self.slots_key)
        return sorted(int(slot) for slot in raw)

    def _new_version(self) -> None:
        """A limit changed: a new version (made first where Redis lost it, as on one Redis),
        written to every slot's copy."""
        self._call(self.client.set, self.version_key, str(now_ms_local()), nx=True)
        version = self._call(self.client.incr, self.version_key)
        self._write_version(str(version))

    def current_version(self) -> str:
        """The config version (made, and copied to every slot in use, when Redis has none)."""
        made = self._call(self.client.set, self.version_key, str(now_ms_local()), nx=True)
        version = _text(self._call(self.client.get, self.version_key) or "")
        if made:
            self._write_version(version)
        return version

    def _write_version(self, version: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for slot in self._used_slots():
            pipe.set(f"{self.prefix}:{{{slot_tag(slot)}}}:config:version", version)
        self._call(pipe.execute)

    # -- the registries, per slot ----------------------------------------------------------
    def _each_slot(self, command: str, *args: Any) -> list[tuple[int, Any]]:
        """``command`` on the registry ``<name>`` of every slot in use, in one pipeline."""
        slots = self._used_slots()
        pipe = self.client.pipeline(transaction=False)
        for slot in slots:
            getattr(pipe, command)(*args_for(self.prefix, slot, args))
        replies = self._call(pipe.execute)
        return list(zip(slots, replies, strict=True))

    def backlog(self, *, now_ms: int | None = None) -> tuple[int, float | None]:
        count, since = 0, None
        now = now_ms_local() if now_ms is None else now_ms
        pairs = self._each_slot("zrange", "ledger:backlog", 0, 0, "withscores")
        cards = self._each_slot("zcard", "ledger:backlog")
        for (_, first), (_, card) in zip(pairs, cards, strict=True):
            count += int(card)
            if first:
                score = int(first[0][1])
                since = score if since is None else min(since, score)
        waited = None if since is None else max(now - since, 0) / 1000
        return count, waited

    def backlog_scopes(self) -> Iterator[str]:
        for _, members in self._each_slot("zrange", "ledger:backlog", 0, -1):
            for key in members:
                yield self.scope_of(key, "x")

    def due_scopes(self, *, limit: int = 100_000, now_ms: int | None = None) -> list[str]:
        now = self._redis_now() if now_ms is None else now_ms
        scopes: list[str] = []
        for _, keys in self._each_slot("zrangebyscore", "ledger:due", "-inf", now):
            scopes += [self.scope_of(key, "p") for key in keys]
        return scopes[:limit]

    def _redis_now(self) -> int:
        seconds, micros = self._call(self.client.time)
        return int(seconds) * 1000 + int(micros) // 1000


def args_for(prefix: str, slot: int, args: tuple[Any, ...]) -> list[Any]:
    """A per-slot registry command's arguments: its name becomes the slot's key."""
    name, *rest = args
    return [f"{prefix}:{{{slot_tag(slot)}}}:{name}", *rest]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def now_ms_local() -> int:
    return int(time.time() * 1000)
