"""Run the whole demo: web server, Celery worker and Celery beat, until Ctrl-C.

    python -m project.devtools.run      (``make run`` wraps it in with_redis)

Each child runs in its own process group so stopping it also stops its workers. If any child
dies, the others are stopped and we exit non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = ["main"]

BASE_DIR = Path(__file__).resolve().parent.parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
POLL_SECONDS = 0.2


def child_commands(port: int) -> dict[str, list[str]]:
    """The processes of the demo, by name; ``sys.executable -m`` so no PATH is needed."""
    python = sys.executable
    return {
        "web": [
            python, "-m", "gunicorn", "project.wsgi:application",
            "-b", f"{HOST}:{port}", "-w", "2", "--access-logfile", "-", "--no-control-socket",
        ],
        "worker": [python, "-m", "celery", "-A", "project", "worker", "-l", "info",
                   "--concurrency", "2"],
        "beat": [python, "-m", "celery", "-A", "project", "beat", "-l", "info",
                 "-s", str(BASE_DIR / "var" / "celerybeat-schedule")],
    }  # fmt: skip


@dataclass
class Supervisor:
    """Starts named children, each in its own process group, and stops them all together."""

    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str]) -> None:
        """Start ``command`` in a new process group, from the project directory."""
        self.children[name] = subprocess.Popen(command, cwd=BASE_DIR, process_group=0)

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


def demo_token() -> str:
    """The demo user's API token (``seed_demo`` creates it if needed)."""
    result = subprocess.run(
        [sys.executable, "manage.py", "seed_demo", "--print-token"],
        cwd=BASE_DIR,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]


def web_answers(base_url: str) -> bool:
    """True once the web server answers HTTP at all (any status)."""
    try:
        with urllib.request.urlopen(f"{base_url}/admin/login/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_for_web(supervisor: Supervisor, base_url: str) -> None:
    """Return once the web server answers; raise if a child dies or it takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not web_answers(base_url):
        dead = supervisor.dead_child()
        if dead:
            raise RuntimeError(f"{dead} exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the web server did not answer within {READY_TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)


def banner(base_url: str, token: str) -> str:
    """What to print once everything is up."""
    body = '{"model":"gpt-4","messages":[{"role":"user","content":"Hello"}],"max_tokens":50}'
    return f"""
The demo is running (Redis: {os.environ.get("REDIS_URL", "default")}).
  Chat completions  {base_url}/v1/chat/completions
  Your budget       {base_url}/quotas/me/
  Admin             {base_url}/admin/   (admin / admin)
  Demo user         demo / demo, free plan, API token {token}

Try:
  curl -s {base_url}/v1/chat/completions -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" -d '{body}'
  curl -s {base_url}/quotas/me/ -H "Authorization: Bearer {token}"

Press Ctrl-C to stop.
"""


def supervise(supervisor: Supervisor, base_url: str, token: str) -> int:
    """Start the children, announce the demo, and wait until one dies (returns 1)."""
    for name, command in child_commands(int(base_url.rsplit(":", 1)[1])).items():
        supervisor.start(name, command)
    wait_for_web(supervisor, base_url)
    print(banner(base_url, token), flush=True)
    while (dead := supervisor.dead_child()) is None:
        time.sleep(POLL_SECONDS)
    code = supervisor.children[dead].returncode
    print(f"run: {dead} exited with code {code}; stopping the others.", file=sys.stderr)
    return 1


def main() -> int:
    """Run the demo until Ctrl-C (exit 0) or until a child dies (exit 1)."""
    base_url = f"http://{HOST}:{int(os.environ.get('PORT', '8000'))}"
    token = demo_token()
    supervisor = Supervisor()
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return supervise(supervisor, base_url, token)
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


if __name__ == "__main__":
    sys.exit(main())
