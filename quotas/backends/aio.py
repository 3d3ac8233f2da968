"""The Redis store for coroutines: ``RedisWindowStore``'s twin over ``redis.asyncio``.

Framework-free. It runs the same Lua scripts with the same keys and arguments as the sync
store, and reads their replies the same way: each operation is the sync store's own method,
run twice on a copy of it whose script runner is a stand-in. The first pass stops at the
script call and hands over its keys and arguments; the script then runs on Redis without
blocking the event loop; the second pass gets the reply in place of the call and parses it.
So the async path can never drift from the sync one (one place builds a call, one reads it).

Every Redis error is raised as ``StoreUnavailable``, as the sync store does.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.utils import HIREDIS_AVAILABLE

from quotas.backends.records import as_text
from quotas.backends.redis import RedisWindowStore
from quotas.backends.scripts import script_sha, script_source
from quotas.core.decisions import Decision, Peek, SettleOutcome
from quotas.exceptions import StoreUnavailable

__all__ = ["AsyncRedisWindowStore", "AsyncScriptRunner", "async_client_for"]

# The connection settings that mean the same to redis.asyncio as to redis-py.
PORTABLE_SETTINGS = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "client_name",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
)


class _HiredisPacking:
    """Packs commands with hiredis's C packer, as redis-py's sync connections do when hiredis
    is installed (its ``redis.asyncio`` connections pack in Python: a settle's 31 arguments
    cost more CPU there than the rest of ``asettle``). The bytes sent are the same."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


def _packing(kind: type[Any]) -> type[Any]:
    if not HIREDIS_AVAILABLE:
        return kind
    return type(kind.__name__, (_HiredisPacking, kind), {"__module__": __name__})


_CONNECTION_CLASSES = {
    kind.__name__: _packing(kind)
    for kind in (aioredis.Connection, aioredis.SSLConnection, aioredis.UnixDomainSocketConnection)
}


def async_client_for(client: Redis) -> aioredis.Redis | None:
    """A ``redis.asyncio`` client to the same server with the same connection settings
    (host, database, credentials, TLS, timeouts), or ``None`` for a client without one
    connection pool of a known kind (Redis Cluster)."""
    pool = getattr(client, "connection_pool", None)
    connection_class = getattr(pool, "connection_class", None)
    kind = _CONNECTION_CLASSES.get(getattr(connection_class, "__name__", ""))
    if pool is None or kind is None:
        return None
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in PORTABLE_SETTINGS}
    # A closed idle connection (Redis restarted) is replaced once, at once; a timeout is
    # never retried (the script may have run), as in the sync runner.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    async_pool = aioredis.ConnectionPool(connection_class=kind, retry=retry, **kwargs)
    return aioredis.Redis(connection_pool=async_pool)


class AsyncScriptRunner:
    """Runs the store's scripts on a ``redis.asyncio`` client: ``EVALSHA``, and ``EVAL``
    with the source when Redis does not know the script (restarted or flushed)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; ``StoreUnavailable`` on any Redis or socket error."""
        try:
            try:
                return await self.client.evalsha(script_sha(name), len(keys), *keys, *args)
            except NoScriptError:
                return await self.client.eval(script_source(name), len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc


class _ScriptCall(Exception):
    """The first pass reached its script call (control flow, never seen outside)."""

    def __init__(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> None:
        super().__init__(name)
        self.name, self.keys, self.arguments = name, keys, args


class _Replay:
    """Stands in for the sync store's ``ScriptRunner``: the first call stops the method with
    its script call; the second call returns that script's reply."""

    _NOTHING = object()

    def __init__(self) -> None:
        self.reply: Any = self._NOTHING

    def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self.reply is self._NOTHING:
            raise _ScriptCall(name, keys, args)
        return self.reply


class AsyncRedisWindowStore:
    """The sync store's decisions as coroutines (``reserve``, ``settle``, ``peek``,
    ``current_version``): same scripts, keys, arguments and parsed results.

    ``client`` is ``None`` for a client ``async_client_for`` cannot mirror (Redis Cluster):
    each call then runs the sync store in a worker thread (``asyncio.to_thread``), so the
    event loop still never waits on Redis.
    """

    def __init__(self, store: RedisWindowStore, client: aioredis.Redis | None) -> None:
        self.store = store
        self.client = client
        self.scripts = AsyncScriptRunner(client) if client is not None else None

    async def reserve(self, *args: Any, **kwargs: Any) -> Decision:
        """``RedisWindowStore.reserve``, awaited."""
        decision: Decision = await self._replay("reserve", args, kwargs)
        return decision

    async def settle(self, *args: Any, **kwargs: Any) -> SettleOutcome:
        """``RedisWindowStore.settle``, awaited."""
        outcome: SettleOutcome = await self._replay("settle", args, kwargs)
        return outcome

    async def peek(self, *args: Any, **kwargs: Any) -> Peek:
        """``RedisWindowStore.peek``, awaited."""
        peek: Peek = await self._replay("peek", args, kwargs)
        return peek

    async def current_version(self) -> str:
        """``RedisWindowStore.current_version``, awaited."""
        if self.client is None:
            return await asyncio.to_thread(self.store.current_version)
        key = self.store.version_key
        try:
            await self.client.set(key, str(int(time.time() * 1000)), nx=True)
            return as_text(await self.client.get(key) or "")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    async def aclose(self) -> None:
        """Close the client's connections."""
        if self.client is not None:
            await self.client.aclose()

    async def _replay(self, method: str, args: Any, kwargs: Any) -> Any:
        if self.scripts is None:
            return await asyncio.to_thread(getattr(self.store, method), *args, **kwargs)
        shape = copy.copy(self.store)  # shares the key caches; its own runner per call
        runner = shape.scripts = _Replay()  # type: ignore[assignment]
        try:
            return getattr(shape, method)(*args, **kwargs)  # no script call: done
        except _ScriptCall as call:
            runner.reply = await self.scripts.run(call.name, call.keys, call.arguments)
        return getattr(shape, method)(*args, **kwargs)
