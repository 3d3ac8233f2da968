"""End to end: requests/s of the demo's ``POST /v1/chat/completions`` with and without quota
enforcement, served by gunicorn (``WORKERS`` sync workers) on the same machine as the load.

The baseline is the same server with ``GATEWAY_ENFORCE_QUOTAS=0`` (no throttle, so no reserve,
settle or ledger task). The two modes run alternately (off, on, on, off) so drift on a shared
machine hits both alike. The user has a budget it cannot exhaust, so every answer is a 200.

Load: ``wrk`` when it is installed, else a Python load generator (one process per connection,
``http.client``), which is slower, so its figures are lower but the ratio still holds.

Run alone: ``python bench/endtoend.py``.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
from common import Row

WORKERS = 2
CONNECTIONS = 4
SECONDS = int(os.environ.get("BENCH_E2E_SECONDS", "8"))
WARMUP_SECONDS = 1
PATH = "/v1/chat/completions"
BODY = json.dumps(
    {
        "model": "gpt-4",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
        ],
        "max_tokens": 64,
    }
)
ORDER = (False, True, True, False)  # enforcement per round


@dataclass(frozen=True)
class Load:
    """One measured run."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


class Skip(Exception):
    """The end-to-end figures cannot be measured here (the message says why)."""


# -- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, enforce: bool) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **common.bench_env(),
        "DJANGO_SETTINGS_MODULE": "e2e_settings",
        "PYTHONPATH": os.pathsep.join([str(common.BENCH_DIR), str(common.REPO)]),
        "CELERY_BROKER_URL": common.redis_url(),
        "GATEWAY_ENFORCE_QUOTAS": "1" if enforce else "0",
    }
    env.pop("DATABASE_URL", None)
    command = [
        sys.executable, "-m", "gunicorn", "project.wsgi:application",
        "-b", f"127.0.0.1:{port}", "-w", str(WORKERS), "--chdir", str(common.REPO),
        "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, process_group=0)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def post(port: int, token: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", PATH, BODY, headers=headers(token))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def headers(token: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


def wait_ready(server: subprocess.Popen[bytes], port: int, token: str, enforce: bool) -> None:
    """Wait for the first answer; check it is a 200 and that enforcement is as asked."""
    deadline = time.monotonic() + 60
    while True:
        if server.poll() is not None:
            raise Skip(f"gunicorn exited with code {server.returncode} before answering.")
        try:
            status, response_headers, body = post(port, token)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise Skip("gunicorn did not answer within 60 s.") from None
            time.sleep(0.2)
    if status == 404:
        raise Skip(f"POST {PATH} answers 404: the demo gateway is not there yet.")
    if status != 200:
        raise Skip(f"POST {PATH} answers {status}: {body[:300]!r}")
    limited = any(name.lower() == "x-ratelimit-limit" for name in response_headers)
    if limited != enforce:
        raise Skip(
            "the gateway does not honour GATEWAY_ENFORCE_QUOTAS="
            f"{int(enforce)} (X-RateLimit-Limit header {'missing' if enforce else 'present'})."
        )


# -- the load ---------------------------------------------------------------------------------
def run_wrk(port: int, token: str, seconds: int, script: Path) -> Load:
    url = f"http://127.0.0.1:{port}{PATH}"
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script)]
    output = subprocess.run(
        [*command, url], capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    return parse_wrk(output)


def wrk_script(token: str) -> Path:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{BODY}]==]",
        *(f'wrk.headers["{name}"] = "{value}"' for name, value in headers(token).items()),
    ]
    handle, name = tempfile.mkstemp(prefix=f"{common.PREFIX}-", suffix=".lua")
    with os.fdopen(handle, "w") as script:
        script.write("\n".join(lines) + "\n")
    return Path(name)


def parse_wrk(output: str) -> Load:
    def duration_ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Load(
        float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        duration_ms(percentiles["50"]),
        duration_ms(percentiles["99"]),
        requests,
        errors,
    )


def python_client(port: int, token: str, seconds: float, results: Any) -> None:
    """One connection's worth of load: sequential POSTs until the deadline."""
    latencies, errors = [], 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            connection.request("POST", PATH, BODY, headers=headers(token))
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            connection.close()  # reconnects on the next request
            ok = False
        latencies.append((time.perf_counter() - start) * 1000)
        errors += not ok
    results.put((latencies, errors))


def run_python_load(port: int, token: str, seconds: int) -> Load:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    clients = [
        context.Process(target=python_client, args=(port, token, seconds, results))
        for _ in range(CONNECTIONS)
    ]
    for client in clients:
        client.start()
    latencies, errors = [], 0
    for _ in clients:
        part, part_errors = results.get(timeout=seconds + 60)
        latencies += part
        errors += part_errors
    for client in clients:
        client.join()
    stats = common.Stats.of(latencies)
    return Load(len(latencies) / seconds, stats.median, stats.p99, len(latencies), errors)


def measure_load(port: int, token: str, script: Path | None) -> Load:
    if script is not None:
        run_wrk(port, token, WARMUP_SECONDS, script)
        return run_wrk(port, token, SECONDS, script)
    run_python_load(port, token, WARMUP_SECONDS)
    return run_python_load(port, token, SECONDS)


# -- the benchmark ----------------------------------------------------------------------------
def bench_token() -> str:
    """A user with a budget no run can exhaust, and its API token."""
    from django.db import connections
    from rest_framework.authtoken.models import Token

    user = common.make_user("e2e", 10**13)
    token = Token.objects.create(user=user).key
    connections.close_all()  # the servers write the same SQLite file
    return token


def measure_all() -> tuple[dict[bool, list[Load]], str]:
    token = bench_token()
    script = wrk_script(token) if shutil.which("wrk") else None
    loads: dict[bool, list[Load]] = {False: [], True: []}
    try:
        for enforce in ORDER:
            port = free_port()
            server = start_server(port, enforce)
            try:
                wait_ready(server, port, token, enforce)
                loads[enforce].append(measure_load(port, token, script))
            finally:
                stop_server(server)
    finally:
        if script is not None:
            script.unlink()
    return loads, "wrk" if script is not None else "Python load generator"


def run() -> list[Row]:
    """Measure both modes; return the summary rows (one explanatory row if skipped)."""
    try:
        loads, tool = measure_all()
    except Skip as exc:
        section = "End to end"
        return [Row(section, "skipped", str(exc), "", ">= 90% of unenforced req/s", "SKIP")]
    section = (
        f"End to end: POST {PATH}, gunicorn {WORKERS} sync workers, {tool}, "
        f"{CONNECTIONS} connections, {len(ORDER)} x {SECONDS} s (ratio to unenforced)"
    )
    summary = {enforce: average(runs) for enforce, runs in loads.items()}
    base = summary[False].requests_per_second
    rows = []
    for enforce, label in ((False, "quotas off (baseline)"), (True, "quotas enforced")):
        load = summary[enforce]
        share = load.requests_per_second / base
        rows.append(
            Row(
                section,
                label,
                f"{load.requests_per_second:7.1f} req/s, p50 {load.p50_ms:.1f} ms, "
                f"p99 {load.p99_ms:.1f} ms, {load.errors} errors",
                f"{share:.3f}",
                ">= 0.90" if enforce else "",
                common.verdict(share >= 0.9 and load.errors == 0) if enforce else "",
            )
        )
    # With every worker busy, worker time per request is WORKERS / (requests/s).
    extra_ms = WORKERS * 1000 * (1 / summary[True].requests_per_second - 1 / base)
    rows.append(Row(section, "extra worker time per enforced request", f"{extra_ms:.2f} ms"))
    return rows


def average(runs: list[Load]) -> Load:
    count = len(runs)
    return Load(
        sum(r.requests_per_second for r in runs) / count,
        sum(r.p50_ms for r in runs) / count,
        sum(r.p99_ms for r in runs) / count,
        sum(r.requests for r in runs),
        sum(r.errors for r in runs),
    )


if __name__ == "__main__":
    common.main(run)
