"""What every benchmark shares: Django set-up on a private SQLite file and a private Redis key
prefix, clean-up of that prefix, timing helpers and the summary table.

Every figure of one run is measured on the same Redis (``REDIS_URL``) and printed as a ratio
against a baseline measured in the same run, so runs on different machines compare.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# One prefix per run, shared with the processes the run starts (they read it from the env).
PREFIX = os.environ.setdefault("BENCH_PREFIX", f"bench-{secrets.token_hex(4)}")
PID = os.getpid()

__all__ = [
    "PREFIX",
    "REPO",
    "Row",
    "Stats",
    "cleanup",
    "main",
    "make_limits",
    "make_user",
    "measure",
    "postgres_cpu_seconds",
    "print_summary",
    "redis_client",
    "redis_cpu_seconds",
    "redis_url",
    "setup_django",
    "store_reserve",
    "verdict",
]


def redis_url() -> str:
    """The Redis every figure is measured on."""
    return os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def bench_var_dir() -> Path:
    """A private directory for the bench's SQLite ledger (never the developer's ``var/``)."""
    default = Path(tempfile.gettempdir()) / f"quotas-bench-{os.getuid()}"
    return Path(os.environ.get("BENCH_VAR_DIR") or default)


def bench_env() -> dict[str, str]:
    """Environment for Django in this process and in the servers the bench starts."""
    return {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "VAR_DIR": str(bench_var_dir()),
        "REDIS_URL": redis_url(),
        "BENCH_PREFIX": PREFIX,
        "QUOTAS_KEY_PREFIX": f"{PREFIX}:q",
    }


# -- Django -----------------------------------------------------------------------------------
_django_ready = False


def setup_django(database_url: str | None = None) -> None:
    """Configure Django on the bench's own SQLite file (or ``database_url``, a database of
    the bench's own), migrate it, and point every key the bench writes (quota windows, cache,
    throttles) under ``PREFIX``. Idempotent."""
    global _django_ready
    if _django_ready:
        return
    os.environ.update(bench_env())
    os.environ.pop("DATABASE_URL", None)  # the private SQLite file, never a shared DB ...
    if database_url:  # ... or the bench's own database (bench/ledger_volume.py)
        os.environ["DATABASE_URL"] = database_url
    bench_var_dir().mkdir(parents=True, exist_ok=True)

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test.utils import override_settings

    caches = {"default": {**settings.CACHES["default"], "KEY_PREFIX": PREFIX}}
    quotas = {**settings.QUOTAS, "KEY_PREFIX": f"{PREFIX}:q"}
    rates = {"anon": "1000000/hour", "user": "1000000/hour"}
    rest = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    override_settings(CACHES=caches, QUOTAS=quotas, REST_FRAMEWORK=rest).enable()
    call_command("migrate", verbosity=0, interactive=False)
    reset_quota_runtime()
    atexit.register(cleanup)
    _django_ready = True


def reset_quota_runtime() -> None:
    """Drop the per-process quota store (call after changing ``QUOTAS``)."""
    from quotas import services

    services.reset_runtime()


def make_user(label: str, tokens_per_hour: int, **plan_fields: Any) -> Any:
    """A fresh user on a fresh plan of its own (no request, concurrency or size caps)."""
    from django.contrib.auth import get_user_model

    from quotas.models import Plan, UserQuota

    name = f"{PREFIX}-{label}-{secrets.token_hex(3)}"
    fields: dict[str, Any] = {
        "max_tokens_per_request": None,
        "requests_per_minute": None,
        "max_concurrent_requests": None,
        "default_output_tokens": 256,
        "tier": 0,
        **plan_fields,
    }
    plan = Plan.objects.create(
        name=name, slug=name, tokens_per_hour=tokens_per_hour, is_default=False, is_active=True,
        **fields,
    )  # fmt: skip
    user = get_user_model().objects.create_user(name, password=None)
    UserQuota.objects.create(user=user, plan=plan)
    return user


# -- Redis ------------------------------------------------------------------------------------
def redis_client() -> Any:
    """A plain redis-py client on the bench's Redis (for baselines and ``MEMORY USAGE``)."""
    import redis

    return redis.Redis.from_url(redis_url())


def redis_cpu_seconds() -> float:
    """CPU seconds the bench's Redis server has used so far (``INFO cpu``: the whole server,
    so a figure is this run's only while nothing else uses it)."""
    info = redis_client().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (as uvicorn picks), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its live children (a server's
    workers), read from ``/proc``; a process gone meanwhile counts nothing."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # gone, or not ours to read
                continue
    family = [pid, *(child for child, fields in stats.items() if int(fields[1]) == pid)]
    # utime, stime (fields 14 and 15 of the whole line)
    return sum((int(stats[p][11]) + int(stats[p][12])) / tick for p in family if p in stats)


def postgres_cpu_seconds() -> float | None:
    """CPU seconds used so far by every PostgreSQL server process on this machine (the
    backends and the WAL writer, checkpointer and the rest), read from ``/proc``; ``None``
    where they cannot be read (another OS, or another user's processes hidden)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, found = 0.0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        if not name.startswith("postgres"):
            continue
        fields = rest.split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        found = True
    return total if found else None


def cleanup() -> None:
    """Delete every key of this run (by ``SCAN``, only keys holding ``PREFIX``)."""
    if os.getpid() != PID:  # a forked child inherits atexit handlers: only the parent cleans
        return
    client = redis_client()
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"*{PREFIX}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
    if _django_ready:  # the limits, teams and prices the run made (each named after PREFIX)
        from quotas.models import GlobalLimit, ModelPrice, Team

        GlobalLimit.objects.filter(name__startswith=PREFIX).delete()
        ModelPrice.objects.filter(model__startswith=PREFIX).delete()
        Team.objects.filter(slug__startswith=PREFIX).delete()


# -- timing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Per-call latency in microseconds."""

    median: float
    p99: float
    count: int

    @classmethod
    def of(cls, samples_us: list[float]) -> Stats:
        ordered = sorted(samples_us)
        return cls(statistics.median(ordered), percentile(ordered, 99), len(ordered))


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    rank = max(round(pct / 100 * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def measure(fn: Callable[[], Any], calls: int, warmup: int = 20) -> list[float]:
    """Run ``fn`` ``calls`` times (after ``warmup`` untimed calls); microseconds per call."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        start = clock()
        fn()
        samples.append((clock() - start) / 1000)
    return samples


# -- the summary ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One line of the summary: a figure, its ratio to the run's baseline, and its target."""

    section: str
    name: str
    figure: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


def budget_row(section: str, name: str, admitted: int, budget: int, unit: str = "") -> Row:
    """A figure that must stay within a budget; quotas' own rows carry the target (<= 1.0)."""
    ours = name.startswith("quotas")
    return Row(
        section,
        name,
        f"{admitted} / {budget}{unit}",
        f"{admitted / budget:.3f}",
        "<= 1.0" if ours else "",
        verdict(admitted <= budget) if ours else "",
    )


def verdict(ok: bool | None) -> str:
    """PASS / FAIL, or an empty cell for figures without a target."""
    if ok is None:
        return ""
    return "PASS" if ok else "FAIL"


def print_summary(rows: Iterable[Row], title: str = "Summary") -> None:
    """A plain-text table, one block per section (columns sized per block)."""
    rows = list(rows)
    print(f"\n{title} (Redis {redis_url()}, key prefix {PREFIX})")
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    for section, block in sections.items():
        print(f"\n== {section}")
        print_block(block)
    failed = sum(r.verdict == "FAIL" for r in rows)
    passed = sum(r.verdict == "PASS" for r in rows)
    print(f"\nTargets: {passed} PASS, {failed} FAIL")


def print_block(rows: list[Row]) -> None:
    headers = ("figure", "value", "ratio", "target", "")
    cells = [(r.name, r.figure, r.ratio, r.target, r.verdict) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    print(line.format(*headers).rstrip())
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for cell in cells:
        print(line.format(*cell).rstrip())


def main(run: Callable[[], list[Row]]) -> None:
    """Entry point of one benchmark module run on its own."""
    setup_django()
    started = time.monotonic()
    try:
        rows = run()
    finally:
        cleanup()
    print_summary(rows)
    print(f"({time.monotonic() - started:.0f} s)")


def make_limits(user: Any, count: int, label: str) -> None:
    """Give ``user`` ``count`` limits in all (1 to 6): the plan's hour, then a day and a
    month of cost on its plan, a team's hour, a global minute and a global day of requests.
    Every budget is far out of reach. The global limits and the prices apply only to the
    model ``<PREFIX>-<label>`` (call with that model), so no other part of the run sees them."""
    from quotas import services
    from quotas.models import GlobalLimit, ModelPrice, PlanLimit, UserQuota

    model, big = f"{PREFIX}-{label}", 10**12
    quota = UserQuota.objects.select_related("plan").get(user=user)
    extra: list[Callable[[], Any]] = [
        lambda: PlanLimit.objects.create(
            plan=quota.plan, metric="tokens", window_seconds=86_400, budget=big
        ),
        lambda: PlanLimit.objects.create(
            plan=quota.plan, metric="cost", period="month", budget=big
        ),
        lambda: _join_team(quota, label, big),
        lambda: GlobalLimit.objects.create(
            name=model, metric="tokens", window_seconds=60, model=model, budget=big
        ),
        lambda: GlobalLimit.objects.create(
            name=f"{model}-r", metric="requests", window_seconds=86_400, model=model, budget=big
        ),
    ]
    for make in extra[: count - 1]:
        make()
    if count >= 3:
        ModelPrice.objects.get_or_create(
            model=model, defaults={"input_per_million": 1, "output_per_million": 2}
        )
    services.config_changed()


def _join_team(quota: Any, label: str, budget: int) -> None:
    from quotas.models import Team

    plan = make_user(f"{label}-team-plan", budget).token_quota.plan
    quota.team = Team.objects.create(name=f"{PREFIX}-{label}", slug=f"{PREFIX}-{label}", plan=plan)
    quota.save()


def store_reserve(user: Any, tokens: int, model: str = "") -> Callable[[], Any]:
    """A call of the store's reserve with what ``services.reserve(user, tokens)`` sends (its
    counters and figures), without the engine's Python around it: the store's own cost."""
    from quotas import services
    from quotas.engine.plans import config_for
    from quotas.engine.reservations import Request, ask_for
    from quotas.engine.runtime import reservation_ttl_ms

    services.reserve(user, tokens, model=model)  # limits loaded, counters built
    scope = str(user.pk)
    config = config_for(user)
    request = Request(user, None, scope, "", model, tokens, False, None)
    ask = ask_for(request, config)
    store = services.get_store()

    def call() -> Any:
        return store.reserve(
            scope,
            f"{scope}/{secrets.token_hex(16)}",
            ask.charges.counters,
            ask.charges.amounts,
            ttl_ms=reservation_ttl_ms(),
            version=config.version,
            primary=ask.charges.primary,
            tokens=ask.tokens,
            cost=ask.cost,
            names=ask.charges.names,
            model=model,
        )

    return call
