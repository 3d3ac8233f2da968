"""Running the store's Lua scripts: one ``EVALSHA`` per call, on a connection of each
thread's own (see ``ScriptRunner``). Framework-free."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any, TypeVar

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection

from quotas.exceptions import StoreUnavailable

__all__ = ["ScriptRunner", "script_sha", "script_source"]

T = TypeVar("T")


@cache
def script_source(name: str) -> str:
    """The script's text with the shared helpers it uses prepended (read once per process).

    Redis runs a script's top level on every call, so each helper defined there costs a
    closure per call: only the helpers the script names (and the helpers they name) are
    kept; the shared constants always are.
    """
    lua = resources.files("quotas.backends") / "lua"
    body = (lua / f"{name}.lua").read_text()
    return _helpers_for(body, (lua / "_window.lua").read_text()) + "\n" + body


_FUNCTION = re.compile(r"^local function (\w+)\(.*?^end$\n?", re.MULTILINE | re.DOTALL)


def _helpers_for(body: str, helpers: str) -> str:
    """``helpers`` without the top-level functions ``body`` never reaches."""
    functions = {match.group(1): match for match in _FUNCTION.finditer(helpers)}
    needed: set[str] = set()
    pending = [body]
    while pending:
        text = pending.pop()
        for name, match in functions.items():
            if name not in needed and re.search(rf"\b{name}\b", text):
                needed.add(name)
                pending.append(match.group(0))
    return _FUNCTION.sub(lambda m: m.group(0) if m.group(1) in needed else "", helpers)


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
      call makes a new one; a refused connect is never retried (no redis-py retries); an
      error from the script itself (``ResponseError``) leaves it usable; ``NOSCRIPT`` (Redis
      restarted or flushed its scripts) sends the source once;
    - a connection used before that turns out closed (the server restarted or dropped idle
      clients: ``ConnectionError``) is replaced and the call sent once more, at once. That is
      the case redis-py's pool checks for by polling every connection it lends; here it
      costs nothing until it happens. A timeout is never retried: the call may have run;
    - a connection of a Sentinel pool asks the sentinels for the current primary each time
      it connects (after a failover, the next call reaches the promoted replica);
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
                _open(connection)
                return send(connection)
            except RedisConnectionError:
                if not reused:
                    raise
                connection.disconnect()  # closed while idle: once more, on a new connection
                _open(connection)
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
            # Never redis-py's retries (a client may be configured with backoffs adding up
            # to seconds): a refused or dead Redis is reported at once and the breaker opens.
            kwargs = {**self.pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            connection = self.pool.connection_class(**kwargs)
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


def _open(connection: Any) -> None:
    """Connect a Sentinel-managed connection its own way: ask the sentinels for the current
    primary, which ``send_packed_command`` (connecting to the address it had last, or to
    the service name) would skip. Other connections connect as they send."""
    if isinstance(connection, SentinelManagedConnection) and not _is_connected(connection):
        pool = connection.connection_pool
        if pool.is_master:  # once: a failure is the breaker's to count, not a reason to wait
            connection.connect_to(pool.get_master_address())
        else:
            connection.connect()


def _is_connected(connection: Any) -> bool:
    """True while the connection holds an open socket. redis-py 8 says so itself
    (``is_connected``); the versions before it keep the socket in ``_sock``."""
    connected = getattr(connection, "is_connected", None)
    return bool(connected) if connected is not None else connection._sock is not None
