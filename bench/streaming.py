"""Streaming: concurrent streamed completions held by one server process, WSGI against ASGI,
with and without quota enforcement, on the same machine as the load.

The demo's fake model streams ``ANSWER_TOKENS`` tokens over ``STREAM_SECONDS`` (a model
generating). Four servers, one process each: gunicorn with the demo's WSGI configuration
(``gthread``, ``project/gunicorn.conf.py``'s threads) and uvicorn serving ``project.asgi``,
each with ``GATEWAY_ENFORCE_QUOTAS`` on and off. Each level of ``LEVELS`` opens that many
streams at once and measures the time to first byte (TTFT) and the streams completed per
second. A server *holds* a level while its p99 TTFT stays under ``TTFT_BOUND_SECONDS``.

Targets: ASGI holds at least 10x the concurrent streams of WSGI (at the same TTFT bound);
enforcement adds at most 1 ms to TTFT p50 and costs at most 3 % of streams/s (ASGI, at the
highest level both hold).

Run alone: ``python bench/streaming.py`` (``BENCH_STREAM_LEVELS=1,8,32,128`` to choose).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import common
from common import Row

STREAM_SECONDS = 2.0
ANSWER_TOKENS = 300
LEVELS = [int(n) for n in os.environ.get("BENCH_STREAM_LEVELS", "1,8,32,96").split(",")]
TTFT_BOUND_SECONDS = float(os.environ.get("BENCH_STREAM_TTFT_BOUND", "1.0"))
WSGI_THREADS = 8
BODY = json.dumps(
    {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": "Tell the benchmark a story."}],
        "max_tokens": 400,
        "stream": True,
    }
).encode()


@dataclass(frozen=True)
class Server:
    label: str
    asgi: bool
    enforce: bool


SERVERS = (
    Server("WSGI gunicorn gthread, quotas off", False, False),
    Server("WSGI gunicorn gthread, quotas enforced", False, True),
    Server("ASGI uvicorn, quotas off", True, False),
    Server("ASGI uvicorn, quotas enforced", True, True),
)


@dataclass(frozen=True)
class Level:
    streams: int
    ttft_p50: float
    ttft_p99: float
    streams_per_second: float
    errors: int


def start(server: Server, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **common.bench_env(),
        "DJANGO_SETTINGS_MODULE": "e2e_settings",
        "PYTHONPATH": os.pathsep.join([str(common.BENCH_DIR), str(common.REPO)]),
        "CELERY_BROKER_URL": common.redis_url(),
        "GATEWAY_ENFORCE_QUOTAS": "1" if server.enforce else "0",
        "GATEWAY_FAKE_STREAM_SECONDS": str(STREAM_SECONDS),
        "GATEWAY_FAKE_ANSWER_TOKENS": str(ANSWER_TOKENS),
        "GUNICORN_THREADS": str(WSGI_THREADS),
    }
    env.pop("DATABASE_URL", None)
    if server.asgi:
        command = [
            sys.executable, "-m", "uvicorn", "project.asgi:application", "--port", str(port),
            "--workers", "1", "--lifespan", "off", "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "gunicorn", "--config", "project/gunicorn.conf.py",
            "--bind", f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning",
        ]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=common.REPO, process_group=0)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def one_stream(port: int, token: str) -> tuple[float | None, bool]:
    """(TTFT in seconds, whether the stream ended with ``[DONE]`` after a 200)."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None, False
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
            + BODY
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        body = await asyncio.wait_for(reader.read(1), 120)  # the first byte of the body
        first = time.monotonic() - start
        body += await asyncio.wait_for(reader.read(), 120)  # until the server closes
        status = head.split(b"\r\n", 1)[0] + b" "
        return first, b" 200 " in status and b"data: [DONE]" in body
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None, False
    finally:
        writer.close()


def level(port: int, token: str, streams: int) -> Level:
    async def all_streams() -> tuple[list[tuple[float | None, bool]], float]:
        started = time.monotonic()
        results = await asyncio.gather(*(one_stream(port, token) for _ in range(streams)))
        return results, time.monotonic() - started

    results, elapsed = asyncio.run(all_streams())
    firsts = sorted(first for first, ok in results if ok and first is not None)
    errors = sum(not ok for _, ok in results)
    if not firsts:
        return Level(streams, float("inf"), float("inf"), 0.0, errors)
    return Level(
        streams,
        common.percentile(firsts, 50),
        common.percentile(firsts, 99),
        len(firsts) / elapsed,
        errors,
    )


def wait_ready(port: int, token: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    level(port, token, 2)  # warm: the tokenizer, the views


def measure(server: Server, token: str) -> list[Level]:
    port = free_port()
    process = start(server, port)
    try:
        wait_ready(port, token, process)
        levels = []
        for streams in LEVELS:
            result = level(port, token, streams)
            print(f"  {server.label}: {streams} streams: {result}", flush=True)
            levels.append(result)
            if result.ttft_p99 > 4 * TTFT_BOUND_SECONDS or result.errors:
                break  # degraded: higher levels would only take longer
        return levels
    finally:
        stop(process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def held(levels: list[Level]) -> int:
    """The most streams at once with every stream served and p99 TTFT under the bound."""
    ok = [lv.streams for lv in levels if not lv.errors and lv.ttft_p99 <= TTFT_BOUND_SECONDS]
    return max(ok, default=0)


def run() -> list[Row]:
    """Measure every server; return the summary rows."""
    from endtoend import bench_token

    token = bench_token()
    results = {server: measure(server, token) for server in SERVERS}
    section = (
        f"Streaming: {ANSWER_TOKENS} tokens over {STREAM_SECONDS:.0f} s per stream, one "
        f"process per server, levels {LEVELS}, held = p99 TTFT <= {TTFT_BOUND_SECONDS} s"
    )
    rows = [_held_row(section, server, levels) for server, levels in results.items()]
    wsgi, asgi = held(results[SERVERS[1]]), held(results[SERVERS[3]])
    ratio = asgi / wsgi if wsgi else 0.0  # nothing held under WSGI: nothing to compare
    rows.append(
        Row(section, "ASGI / WSGI streams held (enforced)", f"{asgi} / {wsgi}", f"{ratio:.1f}",
            ">= 10", common.verdict(bool(wsgi) and ratio >= 10))
    )  # fmt: skip
    rows += _enforcement_rows(section, results[SERVERS[2]], results[SERVERS[3]])
    return rows


def _held_row(section: str, server: Server, levels: list[Level]) -> Row:
    top = levels[-1] if levels else None
    detail = (
        f"{held(levels)} held; at {top.streams}: TTFT p50 {top.ttft_p50 * 1000:.0f} ms "
        f"p99 {top.ttft_p99 * 1000:.0f} ms, {top.streams_per_second:.1f} streams/s"
        if top
        else "no level"
    )
    return Row(section, server.label, detail)


def _enforcement_rows(section: str, off: list[Level], on: list[Level]) -> list[Row]:
    both = [(a, b) for a, b in zip(off, on, strict=False) if a.streams == b.streams]
    both = [(a, b) for a, b in both if not a.errors and not b.errors]
    if not both:
        return [Row(section, "enforcement cost (ASGI)", "no level both served", "", "", "FAIL")]
    base, ours = both[-1]
    added = (ours.ttft_p50 - base.ttft_p50) * 1000
    cost = 1 - ours.streams_per_second / base.streams_per_second
    at = f"at {base.streams} streams"
    return [
        Row(section, f"enforcement: TTFT p50 added ({at})", f"{added:.2f} ms", "", "<= 1 ms",
            common.verdict(added <= 1)),
        Row(section, f"enforcement: streams/s lost ({at})", f"{cost * 100:.1f} %", "", "<= 3 %",
            common.verdict(cost <= 0.03)),
    ]  # fmt: skip


if __name__ == "__main__":
    common.main(run)
