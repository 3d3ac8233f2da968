"""Helpers shared by the tests: Redis's clock, a port that refuses connections, and a TCP proxy
to Redis that can lose a reply.

Tests that depend on time read Redis's clock (the one every script uses) and wait for events,
never for a fixed number of milliseconds against a deadline the machine may miss when busy.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "RedisProxy",
    "redis_ms",
    "refusing_port",
    "sleep_until_redis_ms",
    "wait_until",
]


def redis_ms(client: Any) -> int:
    """Redis's clock (``TIME``), in milliseconds: the clock every quota script decides by."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def sleep_until_redis_ms(client: Any, target_ms: int) -> int:
    """Sleep until Redis's clock reaches ``target_ms``; return Redis's time then."""
    while True:
        now = redis_ms(client)
        if now >= target_ms:
            return now
        time.sleep(max(target_ms - now, 1) / 1000)


def wait_until(check: Callable[[], bool], timeout: float = 30.0, every: float = 0.02) -> bool:
    """Poll ``check`` until it is true (``True``) or ``timeout`` seconds pass (``False``).

    The timeout is a bound on a hang, never the expected duration: the check is the event.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses every connection for as long as the block runs.

    The port is bound (so no other process can take it meanwhile) but never listened on, so
    a connection to it is refused at once, as to a stopped server. Unlike a fixed port (1, 9)
    or a port closed after it was picked, no other run on the machine can be listening there.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class RedisProxy:
    """A TCP proxy in front of a Redis server that can lose replies.

    ``lose_next_reply()``: the next reply from the server, on whichever connection it comes,
    is swallowed, and so is everything after it on that connection. The command did run in
    Redis; the client only waits for an answer until its socket timeout (the ambiguous
    timeout). ``reply_lost`` is set once that happened. ``cut()`` closes every connection and
    the listening socket (Redis appears to have gone away).
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.reply_lost = threading.Event()
        self._lose_next = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="redis-proxy").start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def lose_next_reply(self) -> None:
        self.reply_lost.clear()
        with self._lock:
            self._lose_next = True

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = [self.listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # cut
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        black_hole = False
        try:
            while data := source.recv(65536):
                if replies and not black_hole:
                    with self._lock:
                        black_hole, self._lose_next = self._lose_next, False
                    if black_hole:
                        self.reply_lost.set()
                if not black_hole:
                    target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
