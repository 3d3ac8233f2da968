"""A real gunicorn server of the demo project, for integration tests.

The server uses the test run's database (tests must use ``django_db(transaction=True)`` so the
users and tokens they create are committed and visible to it), the same Redis and the test's
own quota key prefix. Ledger tasks run eagerly inside the server, so nothing is queued in the
shared broker.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import quote

from django.conf import settings
from django.db import connection

__all__ = ["MASTERS", "database_url", "free_port", "running_gateway"]

START_TIMEOUT_SECONDS = 20.0
# The gunicorn master of each running server, by port (its workers are its children).
MASTERS: dict[int, int] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url() -> str:
    """A ``DATABASE_URL`` naming the database this test run uses (the test database)."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    if "postgresql" in db["ENGINE"]:
        auth = f"{quote(db['USER'] or '')}:{quote(db['PASSWORD'] or '')}@"
        return f"postgres://{auth}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"
    raise NotImplementedError(f"No DATABASE_URL for {db['ENGINE']}")


def server_env(prefix: str, extra: dict[str, str]) -> dict[str, str]:
    quotas = settings.QUOTAS
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "VAR_DIR": str(settings.VAR_DIR),
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "QUOTAS_KEY_PREFIX": prefix,
        "QUOTAS_WINDOW_SECONDS": str(quotas.get("WINDOW_SECONDS", 3600)),
        "QUOTAS_BUCKET_SECONDS": str(quotas.get("BUCKET_SECONDS", 60)),
        "CELERY_TASK_ALWAYS_EAGER": "1",
        **extra,
    }


@contextmanager
def running_gateway(
    prefix: str, *, workers: int = 2, log: IO[bytes] | None = None, **env: str
) -> Iterator[int]:
    """Start gunicorn on a free port; yield the port once it answers; stop it afterwards.

    The window settings come from the test's ``settings.QUOTAS`` (use ``quota_config`` before
    starting); ``env`` adds variables such as ``GATEWAY_FAKE_ANSWER_TOKENS``. ``log`` (a
    binary file) receives the server's output when given.
    """
    # The listening socket is made here and handed to gunicorn: no other run on the machine
    # can take the port between choosing it and binding it.
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = int(listener.getsockname()[1])
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config=project/gunicorn.conf.py",  # what make run serves with (threaded workers)
        f"--bind=fd://{listener.fileno()}",
        f"--workers={workers}",
        "--graceful-timeout=3",
        "--log-level=warning",
    ]
    with contextlib.ExitStack() as stack:
        output = log if log is not None else stack.enter_context(tempfile.TemporaryFile())
        server = subprocess.Popen(
            command,
            cwd=Path(settings.BASE_DIR),
            env=server_env(prefix, env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share its process group: stopped together
            pass_fds=(listener.fileno(),),
        )
        listener.close()  # gunicorn holds it now
        try:
            _wait_until_ready(server, port, output)
            MASTERS[port] = server.pid
            yield port
        finally:
            MASTERS.pop(port, None)
            _stop(server)


def _wait_until_ready(server: subprocess.Popen, port: int, log: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.returncode}:\n{_read(log)}")
        if _status_of(port, "/quotas/plans/") == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer within {START_TIMEOUT_SECONDS}s:\n{_read(log)}")


def _status_of(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=5)
