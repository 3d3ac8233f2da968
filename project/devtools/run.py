"""Run the whole demo: web server, Celery worker and Celery beat, until Ctrl-C.

    python -m project.devtools.run      (``make run`` wraps it in with_redis)
    python -m project.devtools.run --check-port   (only: is PORT free? exit 2 if not)

First it checks that ``PORT`` (default 8000) is free, and stops at once, naming ``PORT``,
when it is not. Then it migrates, seeds the demo data and collects the static files, starts
the three children (each in its own process group, so stopping it also stops its workers),
and prints the banner last: once the web server that answers on ``PORT`` is provably ours
(it echoes this run's id in a header) and the Celery worker said it is ready. If any child
dies, the others are stopped and we exit non-zero.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = ["RUN_ID_HEADER", "main"]

BASE_DIR = Path(__file__).resolve().parent.parent.parent
HOST = "127.0.0.1"
DEFAULT_PORT = 8000
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
POLL_SECONDS = 0.2
RUN_ID_ENV = "DEMO_RUN_ID"
RUN_ID_HEADER = "X-Demo-Run"
WORKER_READY_ENV = "DEMO_WORKER_READY_FILE"
SETTLE_SECONDS = 0.5
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class StartError(Exception):
    """The demo cannot start; the message says why and what to do (exit code 2)."""


def var_dir() -> Path:
    """Where the demo keeps its files: ``VAR_DIR``, as the settings read it."""
    return Path(os.environ.get("VAR_DIR") or BASE_DIR / "var")


def port_from_env() -> int:
    """``PORT`` as a TCP port number; ``StartError`` naming ``PORT`` otherwise."""
    raw = os.environ.get("PORT") or str(DEFAULT_PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StartError(f"PORT must be a TCP port number (1-65535), not {raw!r}.")
    return int(raw)


def check_port_free(port: int, host: str = HOST) -> None:
    """Raise ``StartError`` (naming ``PORT``) if nothing of ours could listen on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As gunicorn binds: a port left in TIME_WAIT by an earlier run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartError(
                    f"port {port} on {host} is already in use by another program. "
                    f"Choose a free one with PORT, e.g. PORT={port + 1} make run"
                ) from exc
            raise StartError(f"cannot listen on {host}:{port} ({exc}); set PORT.") from exc


def fake_upstream_port(port: int) -> int | None:
    """With ``GATEWAY_FAKE_UPSTREAM=1``, the port of the fake upstream the gateway forwards
    to (``GATEWAY_FAKE_UPSTREAM_PORT``, default ``PORT`` + 100); else ``None``."""
    if os.environ.get("GATEWAY_FAKE_UPSTREAM", "0") in ("", "0"):
        return None
    raw = os.environ.get("GATEWAY_FAKE_UPSTREAM_PORT") or str(port + 100)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StartError(f"GATEWAY_FAKE_UPSTREAM_PORT must be a TCP port, not {raw!r}.")
    return int(raw)


def child_commands(port: int) -> dict[str, list[str]]:
    """The processes of the demo, by name; ``sys.executable -m`` so no PATH is needed.

    Celery logs warnings only (``-q`` drops its start-up banners): beat's INFO line for every
    flush_ledger it sends, every 2 s, would bury the demo's banner. Set CELERY_LOG_LEVEL=info
    to see them.
    """
    python = sys.executable
    level = os.environ.get("CELERY_LOG_LEVEL", "warning")
    upstream = fake_upstream_port(port)
    extra = {"upstream": [python, "-m", "project.fake_upstream", "--port", str(upstream)]}
    return {
        **(extra if upstream else {}),
        # ASGI: uvicorn workers; a stream holds no worker and no thread while it streams.
        # (gunicorn with project/gunicorn.conf.py serves the same project over WSGI.)
        "web": [
            python, "-m", "uvicorn", "project.asgi:application",
            "--host", HOST, "--port", str(port),
            "--workers", os.environ.get("WEB_CONCURRENCY", "2"),
            "--lifespan", "off", "--timeout-graceful-shutdown", "10",
        ],
        "worker": [python, "-m", "celery", "-q", "-A", "project", "worker", "-l", level,
                   "--concurrency", "2"],
        "beat": [python, "-m", "celery", "-q", "-A", "project", "beat", "-l", level,
                 "-s", str(var_dir() / "celerybeat-schedule")],
    }  # fmt: skip


def prepare() -> str:
    """Migrate, seed the demo data, collect the static files; return the demo user's token."""
    manage = [sys.executable, "manage.py"]
    _run_quietly([*manage, "migrate", "--noinput", "-v", "0"])
    _run_quietly([*manage, "collectstatic", "--noinput", "-v", "0"])
    return _run_quietly([*manage, "seed_demo", "--print-token"]).strip().splitlines()[-1]


def fresh_metrics_dir() -> Path:
    """An empty ``PROMETHEUS_MULTIPROC_DIR`` for this run (``PROMETHEUS_MULTIPROC_DIR`` if
    set, else ``var/prometheus``): the web workers and the Celery worker write their metrics
    there; the files of an earlier run would add its counts to this one's (only those
    ``*.db`` files are removed)."""
    path = Path(os.environ.get(METRICS_DIR_ENV) or var_dir() / "prometheus")
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    return path


def _run_quietly(command: list[str]) -> str:
    result = subprocess.run(command, cwd=BASE_DIR, capture_output=True, text=True)
    if result.returncode:
        raise StartError(f"{' '.join(command[1:])} failed:\n{result.stderr.strip()}")
    return result.stdout


@dataclass
class Supervisor:
    """Starts named children, each in its own process group, and stops them all together."""

    env: dict[str, str]
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str]) -> None:
        """Start ``command`` in a new process group, from the project directory."""
        self.children[name] = subprocess.Popen(command, cwd=BASE_DIR, env=self.env, process_group=0)

    def dead_child(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((n for n, p in self.children.items() if p.poll() is not None), None)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every process group, SIGKILL what is still alive after ``timeout``."""
        self._signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        self._signal_groups(signal.SIGKILL)
        for process in self.children.values():
            process.wait()

    def _signal_groups(self, signum: int) -> None:
        # The whole group: gunicorn's and celery's own worker processes go with their master.
        for process in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)


class StopRequested(Exception):
    """Raised in the main loop by the SIGINT/SIGTERM handler."""


def request_stop(_signum: int, _frame: FrameType | None) -> None:
    """Signal handler: leave the main loop; ignore repeats while we are shutting down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise StopRequested


def our_server_answers(base_url: str, run_id: str) -> bool:
    """True once the server on the port answers with this run's id: ours, not another
    program that took the port."""
    try:
        with urllib.request.urlopen(f"{base_url}/quotas/plans/", timeout=1) as response:
            return bool(response.headers.get(RUN_ID_HEADER) == run_id)
    except urllib.error.HTTPError as exc:
        return bool(exc.headers.get(RUN_ID_HEADER) == run_id)
    except OSError:
        return False


def wait_until_up(supervisor: Supervisor, base_url: str, run_id: str, ready_file: Path) -> None:
    """Return once our web server answers and the worker said it is ready (it creates
    ``ready_file``); raise if a child dies or it takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not (ready_file.exists() and our_server_answers(base_url, run_id)):
        dead = supervisor.dead_child()
        if dead:
            raise RuntimeError(f"{dead} exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the demo did not start within {READY_TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)
    # The access log line of the last probe is written just after its answer: let it come
    # out before the banner.
    time.sleep(SETTLE_SECONDS)


def banner(base_url: str, token: str) -> str:
    """What to print once everything is up."""
    body = '{"model":"gpt-4","messages":[{"role":"user","content":"Hello"}],"max_tokens":50}'
    return f"""
The demo is running (Redis: {os.environ.get("REDIS_URL", "default")}).{_upstream_line()}
  Chat completions  {base_url}/v1/chat/completions
  Your budget       {base_url}/quotas/me/
  Health            {base_url}/quotas/health/
  Metrics           {base_url}/metrics   (staff, or METRICS_TOKEN as a bearer token)
  API schema        {base_url}/api/docs/   (Swagger UI; the schema at /api/schema/)
  Admin             {base_url}/admin/   (admin / admin)
  Demo user         demo / demo, free plan (10k tokens/hour, 50k/day), team acme,
                    API token {token}

Try:
  curl -s {base_url}/v1/chat/completions -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" -d '{body}'
  curl -s {base_url}/quotas/me/ -H "Authorization: Bearer {token}"

Press Ctrl-C to stop.
"""


def _upstream_line() -> str:
    url = os.environ.get("GATEWAY_UPSTREAM_URL")
    if not url:
        return ""
    return (
        f"\n  Upstream          {url} (X-Quota-Degrade: allow lets a plan's ladder serve;"
        "\n                    staff see what the gateway learnt of it at /quotas/limits/)"
    )


def supervise(supervisor: Supervisor, port: int, token: str, run_id: str) -> int:
    """Start the children, announce the demo, and wait until one dies (returns 1)."""
    base_url = f"http://{HOST}:{port}"
    ready_file = Path(supervisor.env[WORKER_READY_ENV])
    ready_file.unlink(missing_ok=True)
    for name, command in child_commands(port).items():
        supervisor.start(name, command)
    wait_until_up(supervisor, base_url, run_id, ready_file)
    print(banner(base_url, token), flush=True)
    while (dead := supervisor.dead_child()) is None:
        time.sleep(POLL_SECONDS)
    code = supervisor.children[dead].returncode
    print(f"run: {dead} exited with code {code}; stopping the others.", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl-C (exit 0), until a child dies (exit 1), or refuse to start
    (exit 2: PORT taken or invalid, or a preparation step failed)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        port = port_from_env()
        check_port_free(port)
        upstream = fake_upstream_port(port)
        if upstream:
            check_port_free(upstream)
        if "--check-port" in args:
            return 0
        token = prepare()
    except StartError as exc:
        print(f"run: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    run_id = secrets.token_hex(8)
    ready_file = var_dir() / f"worker-ready-{run_id}"
    if upstream:  # the gateway forwards to the fake upstream through quotas.llm
        os.environ["GATEWAY_UPSTREAM_URL"] = f"http://{HOST}:{upstream}/v1"
    env = {**os.environ, RUN_ID_ENV: run_id, WORKER_READY_ENV: str(ready_file)}
    env[METRICS_DIR_ENV] = str(fresh_metrics_dir())
    supervisor = Supervisor(env=env)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return supervise(supervisor, port, token, run_id)
    except StopRequested:
        print("\nrun: stopping…", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as exc:
        print(f"run: {exc}; stopping the others.", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop_all()
        ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
