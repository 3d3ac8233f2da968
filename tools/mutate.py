"""Plant each deliberate bug of ``tools/mutations.py`` in turn and check the tests catch it.

    make mutate                         every mutation, on the fast test subset
    python tools/mutate.py --list       the mutations and whether each snippet is found
    python tools/mutate.py -k settle    only the mutations whose name contains "settle"

For each mutation: the snippet is replaced in its file, the tests run (pytest, in a process of
their own, with a timeout), and the file is restored byte for byte (its modification time
too), always: after the tests, on Ctrl-C, on SIGTERM. A copy of the file waits in
``var/mutate/`` while it is mutated, so even a run killed outright is undone by the next one.

Outcomes: ``killed`` (a test failed: the bug is caught), ``killed (timeout)`` (the tests hung
or overran ``--timeout``), ``SURVIVED`` (every test passed with the bug in place),
``NOT FOUND`` / ``AMBIGUOUS`` (the snippet is not in the file exactly once: the list needs
updating). The exit status is 0 only when every mutation was killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parent.parent
BACKUPS = ROOT / "var" / "mutate"
# The fast subset every mutation runs against: unit, store-contract and HTTP tests on the real
# Redis and database, without servers, workers or real-time windows. ``-x``: the first failure
# is enough to call a mutation killed.
FAST_TESTS = (
    "tests/core",
    "tests/test_services.py",
    "tests/test_reconciliation.py",
    "tests/test_enforcement_http.py",
    "tests/test_engine_edges.py",
    "tests/test_ambiguous_timeouts.py",
    "tests/test_streams.py",
    "tests/test_ledger_batches.py",
    "tests/test_settle_batches.py",
    "-m",
    "not integration and not slow",
)


@dataclass
class Outcome:
    mutation: Mutation
    result: str
    seconds: float = 0.0

    @property
    def caught(self) -> bool:
        return self.result.startswith("killed")


class Interrupted(Exception):
    """SIGTERM: unwind (and restore the file) as Ctrl-C does."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    restore_leftovers()
    chosen = [m for m in MUTATIONS if not args.k or args.k.lower() in m.name.lower()]
    problems = {m.name: problem for m in chosen if (problem := locate(m))}
    if args.list:
        for m in chosen:
            print(f"{problems.get(m.name, 'found'):<10} {m.path:<32} {m.name}")
        return 1 if problems else 0
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if not args.no_baseline and not baseline_passes(args.timeout):
        print("mutate: the tests fail without any mutation; fix them first.", file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    started = time.monotonic()
    try:
        for number, mutation in enumerate(chosen, 1):
            if mutation.name in problems:
                outcomes.append(Outcome(mutation, problems[mutation.name]))
                continue
            print(f"[{number}/{len(chosen)}] {mutation.name} ...", flush=True)
            outcomes.append(run_one(mutation, args.timeout))
            print(f"    {outcomes[-1].result} in {outcomes[-1].seconds:.1f}s", flush=True)
    except (KeyboardInterrupt, Interrupted):
        print("\nmutate: interrupted; every file is restored.", file=sys.stderr)
        report(outcomes, time.monotonic() - started)
        return 130
    report(outcomes, time.monotonic() - started)
    return 0 if all(o.caught for o in outcomes) and len(outcomes) == len(chosen) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="only mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the tests of one mutation get"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run without any mutation"
    )
    return parser.parse_args(argv)


def locate(mutation: Mutation) -> str:
    """'' when the snippet occurs exactly once in its file, else what is wrong."""
    path = ROOT / mutation.path
    if not path.is_file():
        return "NO FILE"
    count = path.read_text().count(mutation.find)
    if count == 0:
        return "NOT FOUND"
    return "" if count == 1 else "AMBIGUOUS"


def run_one(mutation: Mutation, timeout: float) -> Outcome:
    """Plant the mutation, run its tests, restore the file whatever happens."""
    path = ROOT / mutation.path
    original = path.read_bytes()
    stat = path.stat()
    backup = BACKUPS / mutation.path
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, backup)
    started = time.monotonic()
    try:
        path.write_text(original.decode().replace(mutation.find, mutation.replace, 1))
        code = run_tests(mutation.tests or FAST_TESTS, timeout)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        backup.unlink()
    seconds = time.monotonic() - started
    if code is None:
        return Outcome(mutation, "killed (timeout)", seconds)
    if code == 0:
        return Outcome(mutation, "SURVIVED", seconds)
    if code in (1, 3):  # tests failed, or errored in a fixture: caught either way
        return Outcome(mutation, "killed", seconds)
    return Outcome(mutation, f"ERROR (pytest exit {code})", seconds)


def run_tests(tests: tuple[str, ...], timeout: float) -> int | None:
    """pytest's exit code, or ``None`` when it overran ``timeout`` (its process group is
    killed; so it is on Ctrl-C)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    # No bytecode is written: a .pyc of a mutated module must never outlive the mutation.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    child = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def baseline_passes(timeout: float) -> bool:
    print("baseline: the fast tests without any mutation ...", flush=True)
    started = time.monotonic()
    code = run_tests(FAST_TESTS, timeout)
    print(f"    exit {code} in {time.monotonic() - started:.1f}s", flush=True)
    return code == 0


def restore_leftovers() -> None:
    """Put back any file a killed run left mutated (its copy waits under ``var/mutate``)."""
    if not BACKUPS.exists():
        return
    for backup in sorted(p for p in BACKUPS.rglob("*") if p.is_file()):
        target = ROOT / backup.relative_to(BACKUPS)
        shutil.copy2(backup, target)
        backup.unlink()
        print(f"mutate: restored {target.relative_to(ROOT)}, left mutated by a killed run")


def report(outcomes: list[Outcome], seconds: float) -> None:
    width = max((len(o.mutation.name) for o in outcomes), default=10)
    print()
    print(f"{'mutation':<{width}}  {'file':<30}  {'result':<17}  seconds")
    for o in outcomes:
        name = Path(o.mutation.path).name
        print(f"{o.mutation.name:<{width}}  {name:<30}  {o.result:<17}  {o.seconds:7.1f}")
    caught = sum(o.caught for o in outcomes)
    print(f"\n{caught} of {len(outcomes)} mutations killed in {seconds:.0f}s.")


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted()


if __name__ == "__main__":
    sys.exit(main())
