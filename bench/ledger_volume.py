"""The ledger at volume: rows per second one ledger worker writes into PostgreSQL, and whether
it keeps up with a burst from the web tier.

- ``bulk write``: ``ROWS`` usage records of ``USERS`` users, written the way the Celery
  worker's ``record_usage`` task writes them (``quotas.engine.rows.write_usage``, one batch of
  ``LEDGER_BATCH_SIZE`` records per task, each batch acknowledged in the Redis outboxes).
  Target: at least 5,000 rows/s from one worker process, with the default batches of 200;
  batches of 1,000 are reported beside it. Beside the worker's own CPU per row: the
  database's (every PostgreSQL process, from ``/proc``, so the figure assumes nothing else
  uses this PostgreSQL meanwhile) and Redis's (the outbox acknowledgements). Their sum is
  what the ledger costs one enforced request (one row each), the part the end-to-end
  bench's CPU figures leave out (nothing consumes the ledger tasks there).
- ``burst``: the web tier settles ``BURST`` requests (real ``reserve`` + ``settle`` on the
  bench's Redis: each settle puts its record in the user's outbox) as fast as one process
  can, while the ledger batches that would reach the worker are held back; then one worker
  writes them as its ``record_usage`` tasks do (which acknowledges the outboxes) and runs
  its sweep (``flush_ledger``) once; the backlog must be back to zero. It keeps up when
  its drain rate is at least the web tier's peak: one process's settle rate times
  ``WEB_PROCESSES`` (the cores of this machine by default).

The rows go to a PostgreSQL database of the bench's own (``BENCH_LEDGER_DATABASE_URL``,
default ``postgres://postgres@127.0.0.1:5432/quotas_bench_ledger``, created if missing and
emptied of usage rows after the run); without PostgreSQL the part is skipped (SKIP, not FAIL).
Run alone: ``python bench/ledger_volume.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import common
from common import Row

SECTION = "Ledger volume"
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/quotas_bench_ledger"
ROWS = int(os.environ.get("BENCH_LEDGER_ROWS") or 20_000)
BURST = int(os.environ.get("BENCH_LEDGER_BURST") or 3_000)
USERS = 100
LARGE_BATCH = 1_000  # with LEDGER_BATCH_SIZE = 1000: fewer commits and round trips per row
TARGET_ROWS_PER_SECOND = 5_000
WEB_PROCESSES = int(os.environ.get("BENCH_WEB_PROCESSES") or os.cpu_count() or 1)


def database_url() -> str:
    return os.environ.get("BENCH_LEDGER_DATABASE_URL") or DEFAULT_URL


def ensure_database(url: str) -> str | None:
    """Create the bench's database if missing; ``None`` when it is ready, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        return f"PostgreSQL unavailable: {exc}".splitlines()[0]
    return None


def run() -> list[Row]:
    """Measure in a child process on PostgreSQL (the rest of the bench runs on SQLite)."""
    url = database_url()
    why = ensure_database(url)
    if why:
        return [Row(SECTION, "quotas bulk write", "skipped", "", why, "SKIP")]
    env = {**os.environ, "BENCH_PREFIX": common.PREFIX, "BENCH_LEDGER_CHILD_URL": url}
    child = subprocess.run(
        [sys.executable, __file__, "--child"],
        cwd=common.BENCH_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the ledger bench failed: {child.stderr[-2000:]}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    return rows_of(figures)


def rows_of(f: dict[str, Any]) -> list[Row]:
    write_rate, web_peak, drain = f["write_rows_per_s"], f["web_peak_per_s"], f["drain_per_s"]
    return [
        Row(
            SECTION,
            f"quotas bulk write ({f['rows']} rows, {USERS} users)",
            f"{write_rate:,.0f} rows/s",
            f"{write_rate / TARGET_ROWS_PER_SECOND:.2f}",
            f">= {TARGET_ROWS_PER_SECOND:,} rows/s",
            common.verdict(write_rate >= TARGET_ROWS_PER_SECOND),
        ),
        Row(SECTION, "worker CPU per row (its own process)", f"{f['write_cpu_us']:.0f} us"),
        Row(SECTION, "database CPU per row (every PostgreSQL process)", _us(f["write_db_us"])),
        Row(SECTION, "Redis CPU per row (the outbox acknowledgements)", _us(f["write_redis_us"])),
        Row(
            SECTION,
            "the ledger's CPU per enforced request (one row: worker + database + Redis)",
            _us(
                None
                if f["write_db_us"] is None
                else f["write_cpu_us"] + f["write_db_us"] + f["write_redis_us"]
            ),
        ),
        Row(
            SECTION,
            f"bulk write, batches of {LARGE_BATCH}",
            f"{f['large_rows_per_s']:,.0f} rows/s ({f['large_cpu_us']:.0f} us CPU a row)",
        ),
        Row(SECTION, "web tier settles (one process)", f"{f['web_per_s']:,.0f} records/s"),
        Row(
            SECTION,
            f"quotas drain of a {f['burst']}-record burst",
            f"{drain:,.0f} rows/s, {f['drain_s']:.2f} s, backlog {f['backlog_after']}",
            f"{drain / web_peak:.2f}",
            f">= web peak ({WEB_PROCESSES} x one process)",
            common.verdict(drain >= web_peak and f["backlog_after"] == 0),
        ),
    ]


def _us(value: float | None) -> str:
    if value is None:
        return "not measured (PostgreSQL's processes unreadable)"
    return f"{value:.0f} us"


# -- the child: Django on PostgreSQL -------------------------------------------------------------
def child() -> dict[str, Any]:
    common.setup_django(os.environ["BENCH_LEDGER_CHILD_URL"])
    from django.test.utils import override_settings

    from project.celery import app

    app.conf.task_always_eager = True  # nothing this process sends may reach a shared broker
    users = [common.make_user(f"ledger{i}", 10**12) for i in range(USERS)]
    try:
        with override_settings(QUOTAS=_quotas(LEDGER_BATCH_SECONDS=3600, LEDGER_BATCH_SIZE=10**9)):
            common.reset_quota_runtime()
            figures = {
                "rows": ROWS,
                "burst": BURST,
                **bulk_write(users),
                **bulk_write(users, LARGE_BATCH, "large"),
                **burst(users),
            }
    finally:
        _cleanup(users)
    return figures


def _quotas(**overrides: Any) -> dict[str, Any]:
    from django.conf import settings

    return {**settings.QUOTAS, "LEDGER_BACKLOG_CHECK_SECONDS": 0, **overrides}


def bulk_write(users: list[Any], size: int = 200, key: str = "write") -> dict[str, float]:
    """Rows/s of ``write_usage`` in batches of ``size`` records: one ``record_usage`` task
    each (200 is ``LEDGER_BATCH_SIZE``'s default)."""
    from quotas.engine.rows import write_usage

    payloads = [_payload(users[i % len(users)], i) for i in range(ROWS)]
    database, redis = common.postgres_cpu_seconds(), common.redis_cpu_seconds()
    started, cpu = time.perf_counter(), time.process_time()
    created = sum(write_usage(payloads[i : i + size]) for i in range(0, ROWS, size))
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    database_after, redis_after = common.postgres_cpu_seconds(), common.redis_cpu_seconds()
    assert created == ROWS, (created, ROWS)
    again = write_usage(payloads[:size])  # idempotent: a re-delivered task writes nothing
    assert again == 0, again
    figures = {
        f"{key}_rows_per_s": ROWS / took,
        f"{key}_cpu_us": cpu / ROWS * 1e6,
        # The outbox acknowledgements each batch sends.
        f"{key}_redis_us": (redis_after - redis) / ROWS * 1e6,
        f"{key}_db_us": None,
    }
    if database is not None and database_after is not None:
        figures[f"{key}_db_us"] = (database_after - database) / ROWS * 1e6
    return figures


def _payload(user: Any, i: int) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    return {
        "request_id": f"{user.pk}/bench-{secrets.token_hex(8)}-{i}",
        "scope": str(user.pk),
        "user_id": user.pk,
        "model": "gpt-4o-mini",
        "estimated_tokens": 600,
        "prompt_tokens": 200,
        "completion_tokens": 250,
        "actual_tokens": 450,
        "status": "settled",
        "reserved_at_ms": now_ms - 900,
        "settled_at_ms": now_ms,
        "team": "",
        "estimated_cost": 0,
        "cost": 0,
    }


def burst(users: list[Any]) -> dict[str, float]:
    """The web tier's settle rate in one process, then one worker's drain of that burst:
    the held-back ledger batch written as the worker's ``record_usage`` tasks would (chunks
    of ``LEDGER_BATCH_SIZE``), then the sweep (``flush_ledger``) for anything left."""
    from quotas import ledger, services
    from quotas.engine.health import ledger_backlog
    from quotas.engine.rows import write_usage

    started = time.perf_counter()
    for i in range(BURST):
        reservation = services.reserve(users[i % len(users)], 600)
        services.settle(reservation, prompt_tokens=200, completion_tokens=250)
    web = BURST / (time.perf_counter() - started)
    waiting = ledger_backlog().outboxes
    payloads = _held_back()
    size, drained = 200, 0
    started = time.perf_counter()
    for i in range(0, len(payloads), size):
        drained += write_usage(payloads[i : i + size])
    drained += ledger.flush_ledger()  # the sweep: finds nothing when every batch arrived
    took = time.perf_counter() - started
    return {
        "web_per_s": web,
        "web_peak_per_s": web * WEB_PROCESSES,
        "outboxes_waiting": waiting,
        "drain_per_s": drained / took if took else 0.0,
        "drain_s": took,
        "drained": drained,
        "backlog_after": ledger_backlog().outboxes,
    }


def _held_back() -> list[dict[str, Any]]:
    """The ledger records this process's batcher holds (``LEDGER_BATCH_SECONDS`` is an hour
    here, so none was sent during the burst), taken out of it."""
    from quotas.engine.ledger import ledger_batcher

    batcher = ledger_batcher()
    with batcher._lock:
        payloads, batcher._pending = batcher._pending, []
    return payloads


def _cleanup(users: list[Any]) -> None:
    from quotas.engine import ledger as ledger_batches
    from quotas.models import UsageRecord

    ledger_batches.flush_ledger_batch()  # nothing is left in it; in case the burst failed
    UsageRecord.objects.filter(user__in=users).delete()
    for user in users:
        plan = user.token_quota.plan
        user.delete()
        plan.delete()
    common.cleanup()


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child()))
    else:
        common.main(run)
