"""Run every benchmark on the same Redis and print one summary table.

    make bench                  (finds or starts a Redis, then runs this)
    python bench/run_all.py     (uses REDIS_URL, default redis://127.0.0.1:6379/0)

Each part is also runnable alone (``python bench/<part>.py``). A part that crashes is
reported in the table and the others still run; targets that are missed print FAIL and do
not stop the run. The whole run takes about five minutes on two cores.
"""

from __future__ import annotations

import time
import traceback

import accuracy
import check_cost
import cluster
import common
import endtoend
import estimation
import ledger_volume
import memory
import overshoot
import provider
import redis_cost
import streaming
from common import Row

PARTS = {
    "check cost": check_cost,
    "redis cost": redis_cost,
    "overshoot": overshoot,
    "accuracy": accuracy,
    "memory": memory,
    "estimation": estimation,
    "end to end": endtoend,
    "provider": provider,
    "ledger volume": ledger_volume,
    "cluster": cluster,
    "streaming": streaming,
}


def main() -> int:
    """Run every part; 1 if a part crashed, else 0 (missed targets are reported, not fatal)."""
    common.setup_django()
    started = time.monotonic()
    rows: list[Row] = []
    crashed = False
    try:
        for name, module in PARTS.items():
            part_started = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            try:
                rows += module.run()
            except Exception as exc:  # one broken part must not hide the others' figures
                traceback.print_exc()
                rows.append(Row(name, "crashed", f"{type(exc).__name__}: {exc}", "", "", "FAIL"))
                crashed = True
            print(f"bench: {name} done in {time.monotonic() - part_started:.0f} s", flush=True)
    finally:
        common.cleanup()
    common.print_summary(rows)
    print(f"Total time: {time.monotonic() - started:.0f} s")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
