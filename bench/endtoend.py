"""End to end: requests/s of the demo's ``POST /v1/chat/completions`` with and without quota
enforcement, served by gunicorn (``WORKERS`` sync workers) on the same machine as the load.

The baseline is the same server with ``GATEWAY_ENFORCE_QUOTAS=0`` (no throttle, so no reserve,
settle or ledger task). Quotas run twice: as configured by default (settled in the request)
and with ``SETTLE_BATCH_SECONDS=0.05`` (settles pipelined from a batch). Two reference points
run on the baseline (``e2e_peers``): one Redis ``PING`` per request (no Redis-backed check can
cost less) and DRF's ``UserRateThrottle`` per request. All five servers run at once and take
the load in turn, two seconds each, ``BENCH_E2E_ROUNDS`` rounds in alternating order, so drift
on a shared machine reaches every mode within seconds. The user has a budget it cannot
exhaust, so every answer is a 200.

The sequential part (one client, one request at a time) runs on one more server process,
with one worker, that answers every mode at a path of its own (``e2e_urls``): the modes take
turns request by request, so enforcement's added latency is measured on the same server in
the same run, beside what one ``PING`` and DRF's throttle add.

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
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import common
from common import Row

WORKERS = 2
CONNECTIONS = 4
ROUNDS = int(os.environ.get("BENCH_E2E_ROUNDS", "8"))
SLICE_SECONDS = 2  # each round gives every mode one slice of load, in alternating order
WARMUP_SECONDS = 1
# The sequential part: requests per mode, and how many in a row before the next mode's turn.
SEQUENTIAL = int(os.environ.get("BENCH_E2E_SEQUENTIAL", "400"))
SEQUENTIAL_WARMUP = 20
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


@dataclass(frozen=True)
class Mode:
    """One server configuration."""

    label: str
    enforce: bool = False
    peer: str = ""  # e2e_peers: "ping" or "drf"
    settle_batch_seconds: float = 0.0


OFF = Mode("quotas off (baseline)")
QUOTAS = Mode("quotas enforced", enforce=True)
BATCHED = Mode(
    "quotas enforced, SETTLE_BATCH_SECONDS=0.05", enforce=True, settle_batch_seconds=0.05
)
PING = Mode("one Redis PING per request (floor of any Redis-backed check)", peer="ping")
DRF = Mode("DRF UserRateThrottle per request", peer="drf")
MODES = (OFF, QUOTAS, BATCHED, PING, DRF)


@dataclass(frozen=True)
class Load:
    """One measured run."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_seconds: float = 0.0  # the whole machine's part: server, Redis and load generator
    web_cpu_seconds: float = 0.0  # the server's processes (the database: SQLite, in them)
    redis_cpu_seconds: float = 0.0


class Skip(Exception):
    """The end-to-end figures cannot be measured here (the message says why)."""


# -- the server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, mode: Mode, *, workers: int = WORKERS, routes: bool = False) -> Any:
    """gunicorn serving the demo as ``mode`` says; with ``routes``, one server answering every
    sequential mode at its own path (``e2e_urls``)."""
    env = {
        **os.environ,
        **common.bench_env(),
        "DJANGO_SETTINGS_MODULE": "e2e_settings",
        "PYTHONPATH": os.pathsep.join([str(common.BENCH_DIR), str(common.REPO)]),
        "CELERY_BROKER_URL": common.redis_url(),
        "GATEWAY_ENFORCE_QUOTAS": "1" if mode.enforce else "0",
        "BENCH_E2E_PEER": mode.peer,
        "BENCH_E2E_ROUTES": "1" if routes else "",
        "QUOTAS_SETTLE_BATCH_SECONDS": str(mode.settle_batch_seconds),
    }
    env.pop("DATABASE_URL", None)
    command = [
        sys.executable, "-m", "gunicorn", "project.wsgi:application",
        "-b", f"127.0.0.1:{port}", "-w", str(workers), "--chdir", str(common.REPO),
        "--log-level", "warning", "--no-control-socket",
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


def post(port: int, token: str, path: str = PATH) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, BODY, headers=headers(token))
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


def measure_load(
    port: int, token: str, script: Path | None, seconds: int, server: subprocess.Popen[bytes]
) -> Load:
    """One slice of load, with the CPU time it cost the server's processes, Redis and the
    load generator (a steadier figure than requests/s where neighbours steal time: it is
    what the run used, not how long it waited)."""
    web, redis, load_gen = cpu_seconds(server)
    load = (
        run_wrk(port, token, seconds, script) if script else run_python_load(port, token, seconds)
    )
    web_after, redis_after, load_after = cpu_seconds(server)
    return replace(
        load,
        cpu_seconds=web_after + redis_after + load_after - web - redis - load_gen,
        web_cpu_seconds=web_after - web,
        redis_cpu_seconds=redis_after - redis,
    )


def cpu_seconds(server: subprocess.Popen[bytes]) -> tuple[float, float, float]:
    """CPU seconds used so far by the server's processes, by Redis, and by this process's
    finished children (the load generators)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        common.process_cpu_seconds(server.pid),
        common.redis_cpu_seconds(),
        children.ru_utime + children.ru_stime,
    )


# -- sequential latency -----------------------------------------------------------------------
# Each sequential mode's path on the latency server (``e2e_urls``).
SEQUENTIAL_PATHS = {
    OFF: "/bench/off" + PATH,
    QUOTAS: PATH,
    PING: "/bench/ping" + PATH,
    DRF: "/bench/drf" + PATH,
}


def sequential_latencies(token: str) -> dict[Mode, list[float]]:
    """Milliseconds per request of one client sending requests one after the other (a new
    connection each: the sync worker closes it) to one server process with one worker that
    answers every mode at its own path: the modes take turns request by request (the order
    rotating), so each comparison is the same process, the same moment, ``SEQUENTIAL``
    requests per mode."""
    port = free_port()
    server = start_server(port, QUOTAS, workers=1, routes=True)
    latencies: dict[Mode, list[float]] = {mode: [] for mode in SEQUENTIAL_PATHS}
    modes = list(SEQUENTIAL_PATHS)
    try:
        wait_ready(server, port, token, True)
        for mode in modes:  # each path answers as it should before anything is timed
            status, response_headers, _body = post(port, token, SEQUENTIAL_PATHS[mode])
            limited = any(name.lower() == "x-ratelimit-limit" for name in response_headers)
            if status != 200 or limited != mode.enforce:
                raise Skip(f"{SEQUENTIAL_PATHS[mode]} answers {status}, limited={limited}.")
        for _ in range(SEQUENTIAL_WARMUP):  # warm: every path's code and connections
            for mode in modes:
                post(port, token, SEQUENTIAL_PATHS[mode])
        for i in range(SEQUENTIAL):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                start = time.perf_counter()
                status, _headers, _body = post(port, token, SEQUENTIAL_PATHS[mode])
                if status == 200:
                    latencies[mode].append((time.perf_counter() - start) * 1000)
    finally:
        stop_server(server)
    return latencies


def in_process_parts(calls: int) -> dict[str, float]:
    """Median microseconds of each step enforcement adds to a request, in this process on
    the same Redis: the estimate of the bench's body, the reserve, the settle."""
    from quotas import services

    user = common.make_user("e2e-parts", 10**13)
    body = json.loads(BODY)
    estimate = statistics.median(common.measure(lambda: services.estimate(body), calls))
    reserve = statistics.median(common.measure(lambda: services.reserve(user, 100), calls))

    def both() -> None:
        services.settle(services.reserve(user, 100), total_tokens=90)

    settle = statistics.median(common.measure(both, calls)) - reserve
    return {"estimate (tiktoken)": estimate, "reserve": reserve, "settle": max(settle, 0.0)}


def latency_rows(latencies: dict[Mode, list[float]]) -> list[Row]:
    section = (
        f"End to end, sequential: one client, one request at a time, {SEQUENTIAL} per mode, "
        "modes taking turns on one server process (ms)"
    )
    stats = {mode: common.Stats.of(values) for mode, values in latencies.items() if values}
    if OFF not in stats or QUOTAS not in stats:
        return [Row(section, "skipped", "no successful sequential requests", "", "", "SKIP")]
    rows = [
        Row(section, mode.label, f"p50 {st.median:.2f} / p99 {st.p99:.2f} ms ({st.count})")
        for mode, st in stats.items()
    ]
    added_p50 = stats[QUOTAS].median - stats[OFF].median
    added_p99 = stats[QUOTAS].p99 - stats[OFF].p99
    rows += [
        Row(section, "added by enforcement at p50", f"{added_p50:.2f} ms", "", "<= 0.5 ms",
            common.verdict(added_p50 <= 0.5)),
        Row(section, "added by enforcement at p99", f"{added_p99:.2f} ms", "", "<= 1 ms",
            common.verdict(added_p99 <= 1.0)),
    ]  # fmt: skip
    for peer in (PING, DRF):  # what the reference points add, in the same turns
        if peer in stats:
            rows.append(
                Row(section, f"added at p50 / p99 by: {peer.label}",
                    f"{stats[peer].median - stats[OFF].median:.2f} / "
                    f"{stats[peer].p99 - stats[OFF].p99:.2f} ms")
            )  # fmt: skip
    parts = in_process_parts(200)
    after = settles_after_response()
    waited = 0.0
    for name, us in parts.items():
        if name == "settle" and after:
            name = "settle (after the response is sent: not waited for)"
        else:
            waited += us / 1000
        rows.append(
            Row(section, f"where it goes (in-process median): {name}", f"{us / 1000:.2f} ms")
        )
    rows.append(
        Row(section, "where it goes: the rest (throttle, middleware, headers, ledger thread, GIL)",
            f"{added_p50 - waited:.2f} ms")
    )  # fmt: skip
    return rows


def settles_after_response() -> bool:
    """Whether the bench's servers settle after the response (the app's default, for a plan
    without a concurrent-request limit, as the bench user's)."""
    from quotas.conf import quota_settings

    return bool(quota_settings.SETTLE_AFTER_RESPONSE) and not quota_settings.SETTLE_BATCH_SECONDS


# -- the benchmark ----------------------------------------------------------------------------
def bench_token() -> str:
    """A user with a budget no run can exhaust, and its API token."""
    from django.db import connections
    from rest_framework.authtoken.models import Token

    user = common.make_user("e2e", 10**13)
    token = Token.objects.create(user=user).key
    connections.close_all()  # the servers write the same SQLite file
    return token


def measure_all() -> tuple[dict[Mode, list[Load]], dict[Mode, list[float]], str]:
    """Every mode's server runs at once (idle ones cost nothing); the load goes to one at a
    time, in slices of ``SLICE_SECONDS``, rounds alternating the order. A shared machine's
    drift thus reaches every mode within seconds, and each round gives a paired ratio."""
    token = bench_token()
    script = wrk_script(token) if shutil.which("wrk") else None
    servers: dict[Mode, tuple[subprocess.Popen[bytes], int]] = {}
    loads: dict[Mode, list[Load]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:
            port = free_port()
            servers[mode] = start_server(port, mode), port
        for mode, (server, port) in servers.items():
            wait_ready(server, port, token, mode.enforce)
            measure_load(port, token, script, WARMUP_SECONDS, server)
        for round_no in range(ROUNDS):
            for mode in MODES if round_no % 2 == 0 else reversed(MODES):
                server, port = servers[mode]
                loads[mode].append(measure_load(port, token, script, SLICE_SECONDS, server))
    finally:
        for server, _port in servers.values():
            stop_server(server)
        if script is not None:
            script.unlink()
    latencies = sequential_latencies(token)
    return loads, latencies, "wrk" if script is not None else "Python load generator"


def run() -> list[Row]:
    """Measure every mode; return the summary rows (one explanatory row if skipped)."""
    try:
        loads, latencies, tool = measure_all()
    except Skip as exc:
        section = "End to end"
        return [Row(section, "skipped", str(exc), "", ">= DRF's share of unenforced req/s", "SKIP")]
    section = (
        f"End to end: POST {PATH}, gunicorn {WORKERS} sync workers, {tool}, "
        f"{CONNECTIONS} connections, {ROUNDS} rounds of {SLICE_SECONDS} s per mode "
        "(ratio to unenforced: the median of the rounds' own ratios; their middle half beside it)"
    )
    summary = {mode: average(runs) for mode, runs in loads.items()}
    base = summary[OFF].requests_per_second
    rows = []
    # Each round's own ratio (its slices ran seconds apart); the median of the rounds.
    paired = {
        mode: sorted(
            mine.requests_per_second / theirs.requests_per_second
            for mine, theirs in zip(loads[mode], loads[OFF], strict=True)
        )
        for mode in MODES
    }
    shares = {mode: statistics.median(ratios) for mode, ratios in paired.items()}
    for mode, load in summary.items():
        ratios = paired[mode]
        middle = f"{common.percentile(ratios, 25):.2f}-{common.percentile(ratios, 75):.2f}"
        judged = mode is QUOTAS
        rows.append(
            Row(
                section,
                mode.label,
                f"{load.requests_per_second:7.1f} req/s, p50 {load.p50_ms:.1f} ms, "
                f"p99 {load.p99_ms:.1f} ms, {load.errors} errors, rounds {middle}",
                f"{shares[mode]:.3f}",
                f">= DRF's {shares[DRF]:.3f}" if judged else "",
                common.verdict(shares[mode] >= shares[DRF] and load.errors == 0) if judged else "",
            )
        )
    # With every worker busy, worker time per request is WORKERS / (requests/s).
    for mode in MODES[1:]:
        extra_ms = WORKERS * 1000 * (1 / summary[mode].requests_per_second - 1 / base)
        rows.append(
            Row(section, f"extra worker time per request: {mode.label}", f"{extra_ms:.2f} ms")
        )
    # The same comparison by CPU used: what requests/s would be on a machine of its own.
    cpu = {mode: load.cpu_seconds * 1000 / max(load.requests, 1) for mode, load in summary.items()}
    for mode, load in summary.items():
        count = max(load.requests, 1)
        web, redis = load.web_cpu_seconds * 1e6 / count, load.redis_cpu_seconds * 1e6 / count
        rows.append(
            Row(
                f"{section[: section.index(',')]}: machine CPU per request (web workers with "
                "their SQLite database, Redis, load generator)",
                mode.label,
                f"{cpu[mode]:.2f} ms (web {web:.0f} us, Redis {redis:.0f} us)",
                f"{cpu[OFF] / cpu[mode]:.3f}",
            )
        )
    return rows + latency_rows(latencies)


def average(runs: list[Load]) -> Load:
    count = len(runs)
    return Load(
        sum(r.requests_per_second for r in runs) / count,
        sum(r.p50_ms for r in runs) / count,
        sum(r.p99_ms for r in runs) / count,
        sum(r.requests for r in runs),
        sum(r.errors for r in runs),
        sum(r.cpu_seconds for r in runs),
        sum(r.web_cpu_seconds for r in runs),
        sum(r.redis_cpu_seconds for r in runs),
    )


if __name__ == "__main__":
    common.main(run)
