"""Check cost: microseconds per admission check, against one Redis ``PING`` round trip.

Contenders, each charging 500 tokens (DRF: one request) per call:

- ``quotas.services.reserve`` in steady state (the user's limits already in memory, the
  counters built) with 1, 3 and 6 limits applying (the plan's hour; then a day and a monthly
  cost; then a team's hour, a global minute and a global day of requests), and the raw
  ``RedisWindowStore.reserve`` under the 1-limit one;
- DRF's ``UserRateThrottle`` and ``AnonRateThrottle`` on the django-redis cache;
- ``limits``' moving window and sliding window counter on ``RedisStorage``.

And the async API's client CPU per call against its sync twin's, on one event loop (uvloop
when it is installed, as uvicorn picks): ``services.areserve`` against ``services.reserve``,
and a ``PING`` through ``redis.asyncio`` (the async store's client) against redis-py's.

Calls are timed in short rounds that rotate over the contenders, so a noisy neighbour slows
every contender alike. DRF's history list and ``limits``' moving-window list grow with every
hit; they get a fresh key every round (at most ~100 entries), which flatters them a little.

Run alone: ``python bench/check_cost.py``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import common
from common import Row, Stats

TOKENS = 500
ROUNDS = int(os.environ.get("BENCH_COST_ROUNDS", "40"))
CALLS_PER_ROUND = 100
RESERVATION_TTL_MS = 600_000
PING = "Redis PING (baseline)"
RESERVE = "quotas services.reserve (1 limit)"
RESERVE_3 = "quotas services.reserve (3 limits)"
RESERVE_6 = "quotas services.reserve (6 limits)"
STORE = "quotas RedisWindowStore.reserve (1 limit)"
DRF_USER = "DRF UserRateThrottle"
DRF_ANON = "DRF AnonRateThrottle"
NOOP = "EVALSHA 'return 1' (same keys and args)"
BARE_PING = "PING on a bare connection"
MAIN = (
    PING,
    RESERVE,
    RESERVE_3,
    RESERVE_6,
    STORE,
    DRF_USER,
    DRF_ANON,
    "limits MovingWindow.hit(cost=500)",
    "limits SlidingWindowCounter.hit(cost=500)",
)


class Contender:
    """Something to time: ``call`` is timed; ``prepare`` runs untimed before each round."""

    def __init__(
        self, name: str, call: Callable[[], Any], prepare: Callable[[int], Any] | None = None
    ):
        self.name = name
        self.call = call
        self.prepare = prepare or (lambda _round: None)
        self.samples: list[float] = []
        self.round_medians: list[float] = []
        self.round_cpu: list[float] = []  # this process's CPU microseconds per call, by round


def drf_throttles() -> tuple[type, type]:
    """DRF's user and anonymous throttles at a rate that never refuses, on our cache.

    DRF binds ``THROTTLE_RATES`` when the class is defined, so the rate is set explicitly.
    """
    from django.core.cache import caches
    from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

    class BenchUserThrottle(UserRateThrottle):
        rate = "1000000/hour"
        cache = caches["default"]

    class BenchAnonThrottle(AnonRateThrottle):
        rate = "1000000/hour"
        cache = caches["default"]

    return BenchUserThrottle, BenchAnonThrottle


def quota_contenders() -> list[Contender]:
    from django_redis import get_redis_connection

    from quotas import services

    connection = get_redis_connection("default")
    contenders = [Contender(PING, connection.ping)]
    for name, count in ((RESERVE, 1), (RESERVE_3, 3), (RESERVE_6, 6)):
        user = common.make_user(f"cost-{count}", 10**12)
        model = f"{common.PREFIX}-cost-{count}"
        common.make_limits(user, count, f"cost-{count}")
        services.reserve(user, TOKENS, model=model)  # limits loaded, counters built
        contenders.append(Contender(name, _reserving(user, model)))
    raw_user = common.make_user("cost-raw", 10**12)
    contenders.append(Contender(STORE, common.store_reserve(raw_user, TOKENS)))
    return contenders


def _reserving(user: Any, model: str) -> Callable[[], Any]:
    from quotas import services

    return lambda: services.reserve(user, TOKENS, model=model)


def drf_contenders() -> list[Contender]:
    user_throttle, anon_throttle = drf_throttles()
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory

    state: dict[str, Any] = {}

    def rotate(round_no: int) -> None:
        # A fresh identity each round keeps the history list short (DRF re-pickles it whole).
        address = f"10.{round_no // 250 + 1}.{round_no % 250}.{common.PID % 250}"
        state["user"] = RequestFactory().post("/", REMOTE_ADDR=address)
        state["user"].user = SimpleNamespace(
            pk=f"{common.PREFIX}-drf-{round_no}", is_authenticated=True
        )
        state["anon"] = RequestFactory().post("/", REMOTE_ADDR=address)
        state["anon"].user = AnonymousUser()

    rotate(-1)
    # DRF builds a new throttle per request; so do we.
    return [
        Contender(
            DRF_USER,
            lambda: user_throttle().allow_request(state["user"], None),
            rotate,
        ),
        Contender(DRF_ANON, lambda: anon_throttle().allow_request(state["anon"], None)),
    ]


def limits_contenders() -> list[Contender]:
    from limits import RateLimitItemPerHour
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    storage = RedisStorage(common.redis_url(), key_prefix=f"{common.PREFIX}:limits")
    moving, counter = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerHour(10**9)
    state = {"key": "moving-0"}

    def rotate(round_no: int) -> None:
        # The moving window keeps one list entry per unit of cost: drop last round's list.
        storage.get_connection().delete(f"{storage.key_prefix}:{item.key_for(state['key'])}")
        state["key"] = f"moving-{round_no}"

    return [
        Contender(
            "limits MovingWindow.hit(cost=500)",
            lambda: moving.hit(item, state["key"], cost=TOKENS),
            rotate,
        ),
        Contender(
            "limits SlidingWindowCounter.hit(cost=500)",
            lambda: counter.hit(item, "counter", cost=TOKENS),
        ),
    ]


def diagnostic_contenders() -> list[Contender]:
    """The floors under a reserve, on one connection of their own, as the store sends its
    scripts (``quotas.backends.redis.ScriptRunner``): one PING round trip, and a script call
    with nothing to do (the floor for any one-script design)."""
    from django_redis import get_redis_connection

    from quotas import services

    pool = get_redis_connection("default").connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)
    sha = _send(connection, "SCRIPT", "LOAD", "return 1")
    store = services.get_store()
    keys = [*store.keys("diag")[2:4], "a", "due", "version", store.keys("diag")[0]]
    args = ["", "r", "123", "x" * 40, RESERVATION_TTL_MS, 0, 30, 60_000, 1_000, 1, TOKENS, 0,
            "", "w", "", 1, "s", 10**12, TOKENS, 3_600_000, 60_000, 0, 0, 0]  # fmt: skip
    return [
        Contender(BARE_PING, lambda: _send(connection, "PING")),
        Contender(NOOP, lambda: _send(connection, "EVALSHA", sha, len(keys), *keys, *args)),
    ]


def _send(connection: Any, *command: Any) -> Any:
    connection.send_command(*command, check_health=False)
    return connection.read_response()


def server_side_reserve_us(calls: int = 2000) -> tuple[float, bool]:
    """Microseconds Redis spends running the reserve script (``INFO commandstats``).

    The counter is server-wide: the second value is false when someone else ran scripts
    meanwhile (the figure is then an average over their scripts too).
    """
    from django_redis import get_redis_connection

    connection = get_redis_connection("default")
    reserve = common.store_reserve(common.make_user("cost-server", 10**12), TOKENS)

    def snapshot() -> tuple[int, int]:
        stats = connection.info("commandstats")["cmdstat_evalsha"]
        return int(stats["calls"]), int(stats["usec"])

    calls0, usec0 = snapshot()
    for _ in range(calls):
        reserve()
    calls1, usec1 = snapshot()
    return (usec1 - usec0) / max(calls1 - calls0, 1), calls1 - calls0 == calls


def run() -> list[Row]:
    """Time every contender; return the summary rows."""
    contenders = quota_contenders() + drf_contenders() + limits_contenders()
    contenders += diagnostic_contenders()
    for round_no in range(ROUNDS):
        for contender in contenders:
            contender.prepare(round_no)
            cpu = time.process_time()
            samples = common.measure(contender.call, CALLS_PER_ROUND, warmup=2)
            cpu = time.process_time() - cpu
            contender.round_cpu.append(cpu * 1e6 / (CALLS_PER_ROUND + 2))
            contender.samples += samples
            contender.round_medians.append(statistics.median(samples))
    return rows({c.name: c for c in contenders})


def ratio(contenders: dict[str, Contender], name: str, base: str = PING) -> float:
    """Median over rounds of (this round's median / the base's median in the same round):
    a neighbour's burst of load slows both sides of each ratio alike."""
    pairs = zip(contenders[name].round_medians, contenders[base].round_medians, strict=True)
    return statistics.median(mine / theirs for mine, theirs in pairs)


def rows(contenders: dict[str, Contender]) -> list[Row]:
    stats = {name: Stats.of(c.samples) for name, c in contenders.items()}
    section = "Check cost (us per call, median / p99; ratio to one PING, median of rounds)"
    out = []
    for name in MAIN:
        s, share = stats[name], ratio(contenders, name)
        figure = f"{s.median:7.1f} / {s.p99:7.1f}"
        out.append(Row(section, name, figure, f"{share:5.2f}x"))
    per_limit = (ratio(contenders, RESERVE_6) - ratio(contenders, RESERVE)) / 5
    out.append(
        Row(
            section,
            "each limit beyond the first (from 1 to 6 limits)",
            f"{per_limit * stats[PING].median:7.1f}",
            f"{per_limit:5.2f}x",
            "<= 0.1x PING",
            common.verdict(per_limit <= 0.1),
        )
    )
    for base, label in ((RESERVE, "1 limit"), (RESERVE_3, "3 limits")):
        for name in (DRF_USER, DRF_ANON):
            speedup = ratio(contenders, name, base)
            out.append(
                Row(
                    section,
                    f"services.reserve ({label}) speed-up over {name}",
                    f"{speedup:.2f}x",
                    "",
                    ">= 2x",
                    common.verdict(speedup >= 2),
                )
            )
    out += cpu_rows(contenders)
    out += diagnostic_rows(stats, contenders)
    out += async_rows()
    return out


def cpu_rows(contenders: dict[str, Contender]) -> list[Row]:
    """This process's CPU per call (user and system, the round trip's system calls in it),
    median of rounds: the client's side of the cost, which a VM's slow scheduling of the
    round trip does not inflate as it does the wall time above. Informational."""
    section = "Check cost, client CPU per call (us, median of rounds; ratio to DRF's)"
    cpu = {name: statistics.median(contenders[name].round_cpu)
           for name in (PING, RESERVE, RESERVE_3, STORE, DRF_USER)}  # fmt: skip
    return [
        Row(section, name, f"{us:7.1f}", f"{us / cpu[DRF_USER]:5.2f}x") for name, us in cpu.items()
    ]


ASYNC_CALLS = 200


def async_rows() -> list[Row]:
    """The async API's client CPU per call against the sync call's, median of rounds that
    take turns (this thread's CPU only: the ledger's thread is left out). Informational:
    what an async view pays per call, on the event loop."""
    from django_redis import get_redis_connection

    from quotas import services
    from quotas.engine.aio import aget_store, areserve

    user = common.make_user("cost-async", 10**12)
    model = f"{common.PREFIX}-cost-async"
    services.reserve(user, TOKENS, model=model)  # limits loaded, counters built
    ping = get_redis_connection("default").ping
    loop = common.new_event_loop()

    async def aping() -> Any:
        return await aget_store().client.ping()  # type: ignore[union-attr]

    pairs = {
        "services.areserve against services.reserve (1 limit)": (
            lambda: services.reserve(user, TOKENS, model=model),
            lambda: areserve(user, TOKENS, model=model),
        ),
        "PING: redis.asyncio against redis-py": (ping, aping),
    }
    cpu: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    try:
        for _round in range(max(ROUNDS // 4, 3)):
            for name, (sync_call, async_call) in pairs.items():
                cpu[name][0].append(_thread_cpu_us(sync_call))
                cpu[name][1].append(loop.run_until_complete(_athread_cpu_us(async_call)))
    finally:
        loop.run_until_complete(_close_async_store())
        loop.close()
    section = "Check cost, the async API (client CPU per call, us: async / sync; ratio)"
    out = []
    for name, (sync_us, async_us) in cpu.items():
        mine, theirs = statistics.median(async_us), statistics.median(sync_us)
        out.append(Row(section, name, f"{mine:7.1f} / {theirs:7.1f}", f"{mine / theirs:5.2f}x"))
    return out


def _thread_cpu_us(call: Callable[[], Any]) -> float:
    for _ in range(5):
        call()
    started = time.thread_time()
    for _ in range(ASYNC_CALLS):
        call()
    return (time.thread_time() - started) * 1e6 / ASYNC_CALLS


async def _athread_cpu_us(call: Callable[[], Any]) -> float:
    for _ in range(5):
        await call()
    started = time.thread_time()
    for _ in range(ASYNC_CALLS):
        await call()
    return (time.thread_time() - started) * 1e6 / ASYNC_CALLS


async def _close_async_store() -> None:
    """Close the async store's connections of the running loop (closed next)."""
    from quotas.engine.aio import aget_store

    await aget_store().aclose()


def diagnostic_rows(stats: dict[str, Stats], contenders: dict[str, Contender]) -> list[Row]:
    """Where a reserve's time goes (medians)."""
    section = "Check cost breakdown (medians, us; ratio to one PING)"
    ping = stats[PING].median
    server_us, alone = server_side_reserve_us()
    note = "" if alone else " (other clients' scripts ran meanwhile)"
    figures = [
        ("one PING round trip (redis-py, the baseline above)", ping),
        ("one PING round trip on a bare connection", stats[BARE_PING].median),
        ("EVALSHA of a no-op script, same keys and args, bare", stats[NOOP].median),
        ("reserve script run time inside Redis" + note, server_us),
        ("store.reserve above the no-op EVALSHA", stats[STORE].median - stats[NOOP].median),
        (
            "services.reserve above store.reserve (Python)",
            stats[RESERVE].median - stats[STORE].median,
        ),
    ]
    return [Row(section, name, f"{value:7.1f}", f"{value / ping:5.2f}x") for name, value in figures]


if __name__ == "__main__":
    common.main(run)
