"""Streaming: concurrent streamed completions held by one server process, WSGI against ASGI,
with and without quota enforcement, on the same machine as the load.

The demo's fake model streams ``ANSWER_TOKENS`` tokens over ``STREAM_SECONDS`` (a model
generating). Two kinds of server, one process each: gunicorn with the demo's WSGI configuration
(``gthread``, ``project/gunicorn.conf.py``'s threads) and uvicorn serving ``project.asgi``.
Both servers of a kind run at once, one with ``GATEWAY_ENFORCE_QUOTAS`` off, one enforced.

The load at each level of ``LEVELS`` is that many concurrent *clients*, each a closed loop:
open a stream, read it to its end, open the next. Their first streams start spread over one
stream's length (not all at the same instant), so the servers see a steady arrival rate, as
from many users. The clients send their streams to one server at a time, in slices that
alternate off, enforced, enforced, off (``ROUNDS`` times each), so a neighbour's drift on a
shared machine reaches both. A slice begins with ``WARMUP_SECONDS`` when the server changes
(the previous server's streams end, the clients' phases settle), unmeasured; then
``MEASURE_SECONDS`` are measured: the time to first byte of the body (TTFT, p50 and p99) of
every stream *started* in the measured time, and the streams completed per second (a stream
that straddles the edge of the measured time counts for the share of its length inside it,
so the figure does not jump with the clients' phases).

A server *holds* a level while its p99 TTFT stays under ``TTFT_BOUND_SECONDS`` and no stream
fails; the levels rise until one of the two servers does not hold one. The enforcement's cost
is the TTFT it adds (p50, p99) and the share of streams/s it keeps, per level.

Targets (the async issue's): ASGI holds at least 10x the concurrent streams of WSGI (enforced,
at the same TTFT bound); enforcement adds at most 1 ms to TTFT p50 and costs at most 3 % of
streams/s (ASGI, at the highest level both servers hold).

Informational, not judged: before the levels, ``IDLE_STREAMS`` streams per server opened one
at a time on the idle servers, taking turns (each read to its first byte, then dropped: the
server settles what it produced), so what enforcement adds to a stream's start on its own is
told apart from the levels' queueing and noise; and a *burst* of that many streams opened
at the same instant (the former measure). Each request then waits for the start-up CPU of
the ones ahead of it, so any per-request cost is multiplied by about half the burst.

Run alone: ``python bench/streaming.py``. Knobs: ``BENCH_STREAM_LEVELS`` (``8,16,32,64,128``),
``BENCH_STREAM_ROUNDS`` (2), ``BENCH_STREAM_WARMUP`` (2.5 s), ``BENCH_STREAM_MEASURE``
(3 s per slice), ``BENCH_STREAM_TTFT_BOUND`` (1 s), ``BENCH_STREAM_IDLE`` (100).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

import common
from common import Row

STREAM_SECONDS = 2.0
ANSWER_TOKENS = 300
LEVELS = [int(n) for n in os.environ.get("BENCH_STREAM_LEVELS", "8,16,32,64,128").split(",")]
ROUNDS = int(os.environ.get("BENCH_STREAM_ROUNDS", "2"))
WARMUP_SECONDS = float(os.environ.get("BENCH_STREAM_WARMUP", "2.5"))
MEASURE_SECONDS = float(os.environ.get("BENCH_STREAM_MEASURE", "3"))
TTFT_BOUND_SECONDS = float(os.environ.get("BENCH_STREAM_TTFT_BOUND", "1.0"))
# Streams per server opened one at a time on the idle servers (see ``idle_ttft``).
IDLE_STREAMS = int(os.environ.get("BENCH_STREAM_IDLE", "100"))
IDLE_WARMUP = 10  # streams per server first, unmeasured
IDLE_GAP_SECONDS = 0.02
READ_TIMEOUT_SECONDS = 60
WSGI_THREADS = 8
BODY = json.dumps(
    {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": "Tell the benchmark a story."}],
        "max_tokens": 400,
        "stream": True,
    }
).encode()
OFF, ON = 0, 1  # a kind's two servers: quotas off, quotas enforced


@dataclass(frozen=True)
class Kind:
    label: str
    asgi: bool


KINDS = (Kind("WSGI gunicorn gthread", False), Kind("ASGI uvicorn", True))


@dataclass(frozen=True)
class Level:
    """One server's figures at one level."""

    streams: int
    ttft_p50: float
    ttft_p99: float
    streams_per_second: float
    errors: int
    samples: int
    # The server's CPU (all its processes) over the whole level, per stream it served then:
    # the cost the load's queueing and the machine's neighbours move least.
    cpu_per_stream: float = 0.0

    @property
    def held(self) -> bool:
        return not self.errors and self.samples > 0 and self.ttft_p99 <= TTFT_BOUND_SECONDS


@dataclass(frozen=True)
class Stream:
    """One stream as a client saw it (times from ``time.monotonic``)."""

    server: int
    started: float
    ttft: float | None
    ended: float
    ok: bool


@dataclass(frozen=True)
class Slice:
    """A span of a level's load sent to one server; measured from ``measured`` to ``end``."""

    server: int
    start: float
    measured: float
    end: float


@dataclass
class KindResult:
    levels: list[tuple[Level, Level]]  # (off, enforced) per level, rising
    burst: tuple[Level, Level] | None
    idle: tuple[list[float], list[float]]  # TTFTs of streams one at a time: off, on


# -- the servers ------------------------------------------------------------------------------
def start(asgi: bool, enforce: bool, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **common.bench_env(),
        "DJANGO_SETTINGS_MODULE": "e2e_settings",
        "PYTHONPATH": os.pathsep.join([str(common.BENCH_DIR), str(common.REPO)]),
        "CELERY_BROKER_URL": common.redis_url(),
        "GATEWAY_ENFORCE_QUOTAS": "1" if enforce else "0",
        "GATEWAY_FAKE_STREAM_SECONDS": str(STREAM_SECONDS),
        "GATEWAY_FAKE_ANSWER_TOKENS": str(ANSWER_TOKENS),
        "GUNICORN_THREADS": str(WSGI_THREADS),
    }
    env.pop("DATABASE_URL", None)
    if asgi:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, token: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    run_loop(_burst([port], OFF, token, 2))  # warm: the tokenizer, the views


# -- the clients ------------------------------------------------------------------------------
def run_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run the load on uvloop when it is installed (a lighter client leaves more CPU to the
    servers), else on asyncio's own loop."""
    with asyncio.Runner(loop_factory=common.new_event_loop) as runner:
        return runner.run(coroutine)


def _request(token: str) -> bytes:
    """One streamed chat request, as the clients send it (the server closes after it)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )


async def one_stream(server: int, port: int, token: str) -> Stream:
    """Open one stream, read it to its end; ``ok`` after a 200 that ended with ``[DONE]``."""
    started = time.monotonic()
    ttft = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Stream(server, started, None, time.monotonic(), False)
    try:
        writer.write(_request(token))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
        body = await asyncio.wait_for(reader.read(1), READ_TIMEOUT_SECONDS)  # its first byte
        ttft = time.monotonic() - started
        body += await asyncio.wait_for(reader.read(), READ_TIMEOUT_SECONDS)  # to the close
        ok = b" 200 " in head.split(b"\r\n", 1)[0] + b" " and b"data: [DONE]" in body
        return Stream(server, started, ttft, time.monotonic(), ok)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return Stream(server, started, ttft, time.monotonic(), False)
    finally:
        writer.close()


async def first_byte(port: int, token: str) -> float:
    """Seconds to the first byte of one stream's body; the client then goes away (the
    server settles what it produced when it finds the connection closed)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(token))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
        await asyncio.wait_for(reader.read(1), READ_TIMEOUT_SECONDS)
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"a stream was answered {head.splitlines()[0]!r}")
        return time.monotonic() - started
    finally:
        writer.close()


async def _idle(ports: list[int], token: str) -> tuple[list[float], list[float]]:
    ttfts: tuple[list[float], list[float]] = ([], [])
    for i in range(IDLE_WARMUP + IDLE_STREAMS):
        for server in (OFF, ON) if i % 2 == 0 else (ON, OFF):
            ttft = await first_byte(ports[server], token)
            if i >= IDLE_WARMUP:
                ttfts[server].append(ttft)
            await asyncio.sleep(IDLE_GAP_SECONDS)
    return ttfts


def idle_ttft(ports: list[int], token: str) -> tuple[list[float], list[float]]:
    """TTFTs of ``IDLE_STREAMS`` streams per server opened one at a time, the two servers
    taking turns: what enforcement adds to a stream's start on its own, without the
    queueing and noise of the levels' load."""
    return run_loop(_idle(ports, token))


def slices() -> list[Slice]:
    """Off, enforced, enforced, off, ...: ``ROUNDS`` slices per server, a warm-up wherever
    the server changes (two slices of the same server in a row are one longer slice)."""
    plan: list[Slice] = []
    at, previous = 0.0, None
    for round_no in range(ROUNDS):
        for server in (OFF, ON) if round_no % 2 == 0 else (ON, OFF):
            warm = WARMUP_SECONDS if server != previous else 0.0
            plan.append(Slice(server, at, at + warm, at + warm + MEASURE_SECONDS))
            at, previous = at + warm + MEASURE_SECONDS, server
    return plan


async def _closed_loops(ports: list[int], token: str, clients: int) -> tuple[list[Stream], float]:
    """``clients`` closed loops over the slices' plan; every stream each one saw, and the
    plan's origin."""
    plan = slices()
    origin = time.monotonic() + 0.05
    streams: list[Stream] = []

    async def client(index: int) -> None:
        await asyncio.sleep(max(origin + index * STREAM_SECONDS / clients - time.monotonic(), 0))
        while True:
            now = max(time.monotonic() - origin, 0.0)  # a timer may wake a little early
            current = next((s for s in plan if s.start <= now < s.end), None)
            if current is None:
                return  # the plan is over: in-flight streams have been read to their end
            streams.append(await one_stream(current.server, ports[current.server], token))

    await asyncio.gather(*(client(index) for index in range(clients)))
    return streams, origin


def closed_loop_level(
    ports: list[int], token: str, clients: int, pids: list[int]
) -> tuple[Level, Level]:
    """Both servers' figures at ``clients`` (``pids``: the servers' processes, whose CPU
    over the level is divided by the streams each served)."""
    before = [common.process_cpu_seconds(pid) for pid in pids]
    streams, origin = run_loop(_closed_loops(ports, token, clients))
    spent = [common.process_cpu_seconds(pid) - was for pid, was in zip(pids, before, strict=True)]
    plan = slices()
    return tuple(  # type: ignore[return-value]
        replace(
            _figures(server, clients, streams, origin, plan),
            cpu_per_stream=spent[server] / max(sum(s.ok for s in streams if s.server == server), 1),
        )
        for server in (OFF, ON)
    )


def _figures(
    server: int, clients: int, streams: list[Stream], origin: float, plan: list[Slice]
) -> Level:
    windows = [(origin + s.measured, origin + s.end) for s in plan if s.server == server]
    within = lambda t: any(a <= t < b for a, b in windows)  # noqa: E731
    mine = [s for s in streams if s.server == server]
    ttfts = sorted(s.ttft for s in mine if s.ok and s.ttft is not None and within(s.started))
    # A stream that straddles a window's edge counts for the share of its length inside:
    # whole streams only would make the count jump by one per client with the clients' phases.
    completed = sum(_share(s, windows) for s in mine if s.ok)
    seconds = sum(b - a for a, b in windows)
    errors = sum(not s.ok for s in mine)
    return _level(clients, ttfts, completed / seconds, errors)


def _share(stream: Stream, windows: list[tuple[float, float]]) -> float:
    inside = sum(max(min(b, stream.ended) - max(a, stream.started), 0) for a, b in windows)
    return inside / max(stream.ended - stream.started, 1e-9)


def _level(streams: int, ttfts: list[float], rate: float, errors: int) -> Level:
    if not ttfts:
        return Level(streams, float("inf"), float("inf"), 0.0, errors, 0)
    p50, p99 = common.percentile(ttfts, 50), common.percentile(ttfts, 99)
    return Level(streams, p50, p99, rate, errors, len(ttfts))


async def _burst(ports: list[int], server: int, token: str, streams: int) -> Level:
    started = time.monotonic()
    port = ports[server]
    results = await asyncio.gather(*(one_stream(server, port, token) for _ in range(streams)))
    elapsed = time.monotonic() - started
    ttfts = sorted(s.ttft for s in results if s.ok and s.ttft is not None)
    return _level(streams, ttfts, len(ttfts) / elapsed, sum(not s.ok for s in results))


def burst_level(ports: list[int], token: str, streams: int) -> tuple[Level, Level]:
    """A burst of ``streams`` opened at once, on each server in turn (off, on, on, off, ...),
    pooled per server."""
    runs: dict[int, list[Level]] = {OFF: [], ON: []}
    for round_no in range(ROUNDS):
        for server in (OFF, ON) if round_no % 2 == 0 else (ON, OFF):
            runs[server].append(run_loop(_burst(ports, server, token, streams)))
    return _pooled(runs[OFF]), _pooled(runs[ON])


def _pooled(runs: list[Level]) -> Level:
    """The median run's TTFT and rate (bursts are few), every run's errors."""
    ordered = sorted(runs, key=lambda lv: lv.ttft_p50)
    middle = ordered[(len(ordered) - 1) // 2]
    return Level(
        middle.streams,
        middle.ttft_p50,
        middle.ttft_p99,
        middle.streams_per_second,
        sum(lv.errors for lv in runs),
        sum(lv.samples for lv in runs),
    )


def measure(kind: Kind, token: str) -> KindResult:
    ports = [free_port(), free_port()]
    processes = [start(kind.asgi, server == ON, ports[server]) for server in (OFF, ON)]
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_ready(port, token, process)
        idle = idle_ttft(ports, token)
        levels: list[tuple[Level, Level]] = []
        for clients in LEVELS:
            pair = closed_loop_level(ports, token, clients, [p.pid for p in processes])
            print(f"  {kind.label}, {clients} clients: off {pair[0]}, on {pair[1]}", flush=True)
            levels.append(pair)
            if not (pair[0].held and pair[1].held):
                break  # latency degraded: higher levels would only take longer
        both = [pair for pair in levels if pair[0].held and pair[1].held]
        streams = (both or levels)[-1][0].streams
        burst = burst_level(ports, token, streams)
        print(f"  {kind.label}, burst of {streams}: off {burst[0]}, on {burst[1]}", flush=True)
        return KindResult(levels, burst, idle)
    finally:
        for process in processes:
            stop(process)


def held(levels: list[tuple[Level, Level]], server: int) -> int:
    """The most concurrent clients with every stream served and p99 TTFT under the bound."""
    return max((pair[server].streams for pair in levels if pair[server].held), default=0)


# -- the summary ------------------------------------------------------------------------------
def run() -> list[Row]:
    """Measure both kinds of server; return the summary rows."""
    from endtoend import bench_token

    token = bench_token()
    results = {kind: measure(kind, token) for kind in KINDS}
    section = (
        f"Streaming: {ANSWER_TOKENS} tokens over {STREAM_SECONDS:.0f} s per stream, one "
        f"process per server, closed-loop clients {LEVELS}, {ROUNDS} x {MEASURE_SECONDS:g} s "
        f"measured per server and level, held = p99 TTFT <= {TTFT_BOUND_SECONDS:g} s"
    )
    rows: list[Row] = []
    for kind, result in results.items():
        rows += _kind_rows(section, kind, result)
    wsgi, asgi = (held(results[kind].levels, ON) for kind in KINDS)
    ratio = asgi / wsgi if wsgi else 0.0  # nothing held under WSGI: nothing to compare
    rows.append(
        Row(section, "ASGI / WSGI streams held (enforced)", f"{asgi} / {wsgi}", f"{ratio:.1f}",
            ">= 10", common.verdict(bool(wsgi) and ratio >= 10))
    )  # fmt: skip
    rows += _judged_rows(section, results[KINDS[1]].levels)
    return rows


def _kind_rows(section: str, kind: Kind, result: KindResult) -> list[Row]:
    rows = [
        Row(section, f"{kind.label}: clients held, off / enforced",
            f"{held(result.levels, OFF)} / {held(result.levels, ON)}")
    ]  # fmt: skip
    off_idle, on_idle = result.idle
    if off_idle and on_idle:
        base, ours = sorted(off_idle), sorted(on_idle)
        p50, p90 = statistics.median(base), common.percentile(base, 90)
        added_p50 = statistics.median(ours) - p50
        added_p90 = common.percentile(ours, 90) - p90
        rows.append(
            Row(section, f"{kind.label}, one stream at a time ({len(base)} each)",
                f"off TTFT p50 {_ms(p50)} p90 {_ms(p90)}; enforcement adds p50 "
                f"{added_p50 * 1000:+.2f} ms, p90 {added_p90 * 1000:+.2f} ms")
        )  # fmt: skip
    for off, on in result.levels:
        rows.append(Row(section, f"{kind.label} at {off.streams}: off", _describe(off)))
        rows.append(Row(section, f"{kind.label} at {on.streams}: enforced", _describe(on)))
        if off.held and on.held:  # past the bound, queueing, not enforcement, sets the TTFT
            rows.append(Row(section, f"{kind.label} at {off.streams}: enforcement", _cost(off, on)))
    if result.burst:
        off, on = result.burst
        name = f"{kind.label}, burst of {off.streams} at once (not judged)"
        rows.append(Row(section, name, f"off TTFT p50 {_ms(off.ttft_p50)}, {_cost(off, on)}"))
    return rows


def _describe(level: Level) -> str:
    failed = f", {level.errors} failed" if level.errors else ""
    cpu = f", {_ms(level.cpu_per_stream)} CPU a stream" if level.cpu_per_stream else ""
    return (
        f"TTFT p50 {_ms(level.ttft_p50)} p99 {_ms(level.ttft_p99)}, "
        f"{level.streams_per_second:.1f} streams/s ({level.samples} streams){failed}{cpu}"
    )


def _cost(off: Level, on: Level) -> str:
    rate = on.streams_per_second / off.streams_per_second if off.streams_per_second else 0.0
    cpu = ""
    if off.cpu_per_stream and on.cpu_per_stream:
        cpu = f", CPU a stream {_added(off.cpu_per_stream, on.cpu_per_stream)}"
    return (
        f"TTFT p50 {_added(off.ttft_p50, on.ttft_p50)} p99 {_added(off.ttft_p99, on.ttft_p99)}, "
        f"streams/s x{rate:.3f}{cpu}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _added(base: float, ours: float) -> str:
    return f"{(ours - base) * 1000:+.1f} ms"


def _judged_rows(section: str, levels: list[tuple[Level, Level]]) -> list[Row]:
    both = [(off, on) for off, on in levels if off.held and on.held]
    if not both:
        return [Row(section, "enforcement cost (ASGI)", "no level both held", "", "", "FAIL")]
    off, on = both[-1]
    added = (on.ttft_p50 - off.ttft_p50) * 1000
    kept = on.streams_per_second / off.streams_per_second
    at = f"ASGI, {off.streams} clients"
    return [
        Row(section, f"enforcement: TTFT p50 added ({at})", f"{added:+.2f} ms", "", "<= 1 ms",
            common.verdict(added <= 1)),
        Row(section, f"enforcement: streams/s kept ({at})",
            f"{on.streams_per_second:.1f} / {off.streams_per_second:.1f}", f"{kept:.3f}",
            ">= 0.97", common.verdict(kept >= 0.97)),
    ]  # fmt: skip


if __name__ == "__main__":
    common.main(run)
