"""Redis cost: what one enforced request (a reserve and its settle, through ``services``) costs
Redis itself, on a private ``redis-server`` the bench starts, so no other client's commands
are counted.

Two figures per configuration (the plan's hour alone; then with a day and a monthly cost
limit):

- script time: ``INFO commandstats`` microseconds of ``EVALSHA``/``EVAL`` per request, what
  Redis spends running our scripts (the issue's measure: target <= 60 us, i.e. at least 16k
  decisions per second per Redis core);
- process CPU: the server's ``used_cpu_user + used_cpu_sys`` per request, the scripts plus
  reading requests and writing replies: what sizes a Redis for a traffic.

Also the commands the scripts run per request (``redis.call``, from the same statistics):
on a host where each costs a few microseconds, what the script time mostly is.

Ledger records go to a sender that drops them (``quotas.engine.dispatch``), so the broker is
not part of the figure. Run alone: ``python bench/redis_cost.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import common
from common import Row

REQUESTS = int(os.environ.get("BENCH_REDIS_REQUESTS", "3000"))
TARGET_US = 60.0
SECTION = "Redis cost per enforced request (reserve + settle, private redis-server)"


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix=f"{common.PREFIX}-redis-")
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log"),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for(url: str, server: subprocess.Popen[bytes]) -> None:
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return
        except redis.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def quotas_on(url: str) -> Iterator[None]:
    """``services`` on the Redis at ``url``, with ledger records dropped."""
    from django.conf import settings
    from django.test.utils import override_settings

    from quotas.engine import dispatch

    caches = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": url}}
    previous = dispatch._senders.get(dispatch.RECORD_USAGE)
    dispatch.register(dispatch.RECORD_USAGE, lambda *args, **options: None)
    try:
        with override_settings(CACHES=caches):
            common.reset_quota_runtime()
            yield
    finally:
        if previous is not None:
            dispatch.register(dispatch.RECORD_USAGE, previous)
        common.reset_quota_runtime()


SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


def server_figures(client: Any) -> tuple[int, float, int]:
    """(script microseconds so far, server CPU seconds so far, commands run by scripts so
    far: every command but the script calls and the bench's own ``INFO``)."""
    stats = client.info("commandstats")
    usec = sum(stats.get(name, {}).get("usec", 0) for name in SCRIPT_COMMANDS)
    calls = sum(
        figures.get("calls", 0)
        for name, figures in stats.items()
        if name not in SCRIPT_COMMANDS and name != "cmdstat_info"
    )
    cpu = client.info("cpu")
    return usec, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls


def measure(url: str, user: Any, model: str, requests: int) -> tuple[float, float, float]:
    """Script microseconds, server CPU microseconds and commands run by the scripts, per
    request (reserve + settle)."""
    import redis

    from quotas import services

    client = redis.Redis.from_url(url)
    for _ in range(50):  # counters built, limits cached, scripts loaded
        services.settle(services.reserve(user, 500, model=model), total_tokens=400)
    usec_before, cpu_before, calls_before = server_figures(client)
    for _ in range(requests):
        services.settle(services.reserve(user, 500, model=model), total_tokens=400)
    usec_after, cpu_after, calls_after = server_figures(client)
    return (
        (usec_after - usec_before) / requests,
        (cpu_after - cpu_before) * 1e6 / requests,
        (calls_after - calls_before) / requests,
    )


def run() -> list[Row]:
    common.setup_django()
    try:
        with private_redis() as url, quotas_on(url):
            rows = []
            for count in (1, 3):
                user = common.make_user(f"redis-cost-{count}", 10**13)
                common.make_limits(user, count, f"redis-cost-{count}")
                model = f"{common.PREFIX}-redis-cost-{count}"
                script_us, cpu_us, calls = measure(url, user, model, REQUESTS)
                label = "limit" if count == 1 else "limits"
                rows += [
                    Row(
                        SECTION,
                        f"script time per request ({count} {label})",
                        f"{script_us:.1f} us",
                        f"{1e6 / script_us:,.0f}/s",
                        f"<= {TARGET_US:.0f} us",
                        common.verdict(script_us <= TARGET_US) if count == 1 else "",
                    ),
                    Row(
                        SECTION,
                        f"server CPU per request ({count} {label})",
                        f"{cpu_us:.1f} us",
                        f"{1e6 / cpu_us:,.0f}/s",
                    ),
                    Row(SECTION, f"script commands per request ({count} {label})", f"{calls:.1f}"),
                ]
            return rows
    except FileNotFoundError as exc:
        return [Row(SECTION, "skipped", str(exc), "", f"<= {TARGET_US:.0f} us", "SKIP")]


if __name__ == "__main__":
    common.main(run)
