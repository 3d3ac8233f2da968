"""The release: ``python -m build`` on a clean copy of the checkout makes an sdist and a wheel;
the wheel carries exactly what the app needs at run time, passes ``twine check``, and, installed
into a clean virtual environment outside the checkout, serves a minimal host project
(``manage.py check``, ``migrate``, enforced requests, the admin). The version is written once
(``quotas.__version__``) and the changelog's latest release names it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

import pytest

import quotas

ROOT = Path(__file__).resolve().parent.parent
NAME = "django_llm_quotas"
# What a clean clone does not have: the developer's environments, caches and build output.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", ".nox", "var", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".*_cache",
)  # fmt: skip
# Directories under quotas/ whose every file the app serves or renders at run time.
RUNTIME_DIRS = {"templates", "static"}
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600


def run(*command: str | Path, timeout: float = 120, **kwargs: Any) -> str:
    """Run a command; its stdout, or a failure showing what it printed."""
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        pytest.fail(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# -- the version, written once -------------------------------------------------------------
def test_the_version_is_written_once_and_the_changelog_names_it() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "quotas.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", quotas.__version__)
    assert changelog_releases()[0] == quotas.__version__


def changelog_releases() -> list[str]:
    """The versions CHANGELOG.md has sections for, newest first (Keep a Changelog)."""
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings and headings[0] == "Unreleased", "the changelog opens with [Unreleased]"
    for heading in headings[1:]:  # every release is dated, or says it is not out yet
        assert re.search(rf"^## \[{re.escape(heading)}\] - (\d{{4}}-\d\d-\d\d|unreleased)$",
                         text, flags=re.MULTILINE), heading  # fmt: skip
    return headings[1:]


# -- the built distributions ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel ``python -m build`` makes from a clean copy of the checkout
    (so nothing left in the working tree, such as an old ``build/``, can slip in)."""
    source = tmp_path_factory.mktemp("source") / "django-llm-quotas"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, source, timeout=BUILD_TIMEOUT)
    return out


def wheel_path(dist: Path) -> Path:
    return dist / f"{NAME}-{quotas.__version__}-py3-none-any.whl"


def expected_wheel_files() -> set[str]:
    """Every file of the package the app needs at run time: its modules, Lua scripts,
    ``py.typed`` and compiled translations, and everything under its templates and static
    directories."""
    files = (path.relative_to(ROOT) for path in (ROOT / "quotas").rglob("*") if path.is_file())
    return {path.as_posix() for path in files if "__pycache__" not in path.parts and needed(path)}


def needed(path: Path) -> bool:
    if path.suffix in {".py", ".lua", ".mo"} or path.name == "py.typed":
        return True
    return bool(RUNTIME_DIRS & set(path.parts[1:-1]))


@pytest.mark.integration
@pytest.mark.slow
def test_build_makes_one_sdist_and_one_wheel_of_this_version(dist: Path) -> None:
    assert sorted(path.name for path in dist.iterdir()) == [
        f"{NAME}-{quotas.__version__}-py3-none-any.whl",
        f"{NAME}-{quotas.__version__}.tar.gz",
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_the_wheel_carries_exactly_what_the_app_needs(dist: Path) -> None:
    with zipfile.ZipFile(wheel_path(dist)) as wheel:
        names = set(wheel.namelist())
    info = f"{NAME}-{quotas.__version__}.dist-info/"
    package = {name for name in names if not name.startswith(info)}
    assert package == expected_wheel_files()  # no tests/, project/, bench/ or stray files
    assert {"quotas/backends/lua/reserve.lua", "quotas/migrations/0001_initial.py"} <= package
    assert f"{info}licenses/LICENSE" in names


@pytest.mark.integration
@pytest.mark.slow
def test_the_wheel_metadata_says_what_the_matrix_tested(dist: Path) -> None:
    with zipfile.ZipFile(wheel_path(dist)) as wheel:
        raw = wheel.read(f"{NAME}-{quotas.__version__}.dist-info/METADATA").decode()
    metadata = HeaderParser().parsestr(raw)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["Version"] == quotas.__version__
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Requires-Python"] == ">=3.11"
    extras = pyproject.get("optional-dependencies", {})
    optional = [f'{req}; extra == "{name}"' for name, reqs in extras.items() for req in reqs]
    expected = [*pyproject["dependencies"], *optional]
    assert sorted(metadata.get_all("Requires-Dist")) == sorted(expected)
    assert sorted(metadata.get_all("Provides-Extra")) == sorted(extras)
    classifiers = set(metadata.get_all("Classifier"))
    pythons, djangos = matrix()
    named_pythons = {c.rsplit(" ", 1)[1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)}
    named_djangos = {c.rsplit(" ", 1)[1] for c in classifiers if re.search(r"Django :: \d", c)}
    assert (named_pythons, named_djangos) == (pythons, djangos)


def matrix() -> tuple[set[str], set[str]]:
    """The Pythons and Django releases the noxfile's matrix runs (read, not imported: the
    noxfile needs nox, and selects pyenv's Pythons for the process that imports it)."""
    values = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse((ROOT / "noxfile.py").read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in {"PYTHONS", "DJANGOS"}
    }
    return set(values["PYTHONS"]), set(values["DJANGOS"])


@pytest.mark.integration
@pytest.mark.slow
def test_the_sdist_carries_the_app_and_its_documents_but_no_tests(dist: Path) -> None:
    with tarfile.open(dist / f"{NAME}-{quotas.__version__}.tar.gz") as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    top = {name.split("/", 1)[0] for name in names}
    assert {"CHANGELOG.md", "LICENSE", "README.md", "pyproject.toml", "quotas"} <= top
    assert not top & {"tests", "project", "bench", ".ci"}
    assert {name for name in names if name.startswith("quotas/")} >= expected_wheel_files()


@pytest.mark.integration
@pytest.mark.slow
def test_twine_check_passes(dist: Path) -> None:
    output = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert output.count("PASSED") == 2


# -- the wheel installed outside the checkout ------------------------------------------------
HOST_SETTINGS = """
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "wheel-test-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "quotas",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "quotas.middleware.QuotaMiddleware",
]
ROOT_URLCONF = "host.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
CACHES = {"default": {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": os.environ["REDIS_URL"],
    "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
}}
QUOTAS = {
    "CACHE_ALIAS": "default",
    "KEY_PREFIX": os.environ["QUOTAS_KEY_PREFIX"],
    # One ledger task per request, after commit: the rows are there when the requests return.
    "LEDGER_BATCH_SECONDS": 0,
}
# The ledger's tasks run in-process: the test has no worker (and must not feed a broker).
CELERY_BROKER_URL = "memory://"
CELERY_TASK_ALWAYS_EAGER = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"
USE_TZ = True
"""

HOST_CELERY = """
from celery import Celery

app = Celery("host")
app.config_from_object("django.conf:settings", namespace="CELERY")
"""

HOST_URLS = """
from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path

from quotas.decorators import enforce_quota


@enforce_quota(estimate=lambda request: 600)
def chat(request):
    usage = {"prompt_tokens": 100, "completion_tokens": 150, "total_tokens": 250}
    return JsonResponse({"usage": usage})


urlpatterns = [
    path("chat/", chat),
    path("quotas/", include("quotas.urls")),
    path("admin/", admin.site.urls),
]
"""

# Run by the clean environment's Python: what a host sees, as JSON.
HOST_REQUESTS = """
import importlib.metadata, json, os

import django

django.setup()

from django.contrib.auth import get_user_model
from django.test import Client

import quotas
from quotas.models import Plan, UsageRecord

Plan.objects.create(name="Basic", slug="basic", tokens_per_hour=1000, is_default=True)
user = get_user_model().objects.create_superuser("host-admin", "", "not-a-secret")
client = Client()
client.force_login(user)
chats = [client.post("/chat/", "{}", content_type="application/json") for _ in range(3)]
print(json.dumps({
    "quotas_file": quotas.__file__,
    "version": importlib.metadata.version("django-llm-quotas"),
    "chats": [
        {"status": r.status_code, "remaining": r.get("X-RateLimit-Remaining"),
         "limit": r.get("X-RateLimit-Limit"), "retry_after": r.get("Retry-After"),
         "code": r.json().get("error", {}).get("code")}
        for r in chats
    ],
    "me": client.get("/quotas/me/").json(),
    "ledger": sorted(UsageRecord.objects.values_list("status", "actual_tokens")),
    "admin": [client.get(f"/admin/quotas/{model}/").status_code
              for model in ("plan", "userquota", "usagerecord")],
}))
"""


@pytest.fixture(scope="module")
def clean_env(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment outside the checkout holding the wheel and what it requires
    (at requirements.txt's pinned versions); returns its Python."""
    venv = tmp_path_factory.mktemp("clean") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    constraints = venv.parent / "constraints.txt"
    constraints.write_text(pins_as_constraints())
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-compile",
        "-c", constraints, wheel_path(dist), timeout=INSTALL_TIMEOUT, env=outside_env(),
    )  # fmt: skip
    return python


def pins_as_constraints() -> str:
    """requirements.txt's pins as pip constraints (which may not name extras)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = (line.split("#", 1)[0].strip() for line in lines)
    return "\n".join(re.sub(r"\[[^\]]*\]", "", pin) for pin in pins if pin) + "\n"


def outside_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points into the checkout or its settings."""
    skip = ("PYTHON", "DJANGO_", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(skip)}, **extra}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A minimal host project: settings, Celery app, URLs with one enforced view."""
    package = tmp_path / "host"
    package.mkdir()
    (package / "__init__.py").write_text("from .celery import app as celery_app\n")
    for name, text in {"settings": HOST_SETTINGS, "celery": HOST_CELERY, "urls": HOST_URLS}.items():
        (package / f"{name}.py").write_text(textwrap.dedent(text))
    (tmp_path / "requests_once.py").write_text(textwrap.dedent(HOST_REQUESTS))
    return tmp_path


@pytest.fixture
def host_env(isolated_quotas: str) -> Iterator[dict[str, str]]:
    """The host's environment: this run's Redis, under this test's key prefix (whose keys
    the ``isolated_quotas`` fixture deletes afterwards)."""
    from django.conf import settings

    yield outside_env(
        DJANGO_SETTINGS_MODULE="host.settings",
        REDIS_URL=settings.REDIS_URL,
        QUOTAS_KEY_PREFIX=isolated_quotas,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_the_installed_wheel_serves_a_minimal_project(
    clean_env: Path, host: Path, host_env: dict[str, str]
) -> None:
    manage = ["-m", "django"]
    checked = run(clean_env, *manage, "check", "--fail-level", "WARNING", cwd=host, env=host_env)
    assert "no issues" in checked
    migrated = run(clean_env, *manage, "migrate", "--noinput", cwd=host, env=host_env)
    assert "Applying quotas.0001_initial... OK" in migrated

    seen = json.loads(run(clean_env, "requests_once.py", cwd=host, env=host_env))

    site_packages = clean_env.parent.parent / "lib"
    assert Path(seen["quotas_file"]).is_relative_to(site_packages)  # not the checkout's
    assert seen["version"] == quotas.__version__
    first, second, third = seen["chats"]
    assert (first["status"], first["limit"], first["remaining"]) == (200, "1000", "750")
    assert (second["status"], second["remaining"]) == (200, "500")
    assert (third["status"], third["code"]) == (429, "rate_limit_exceeded")
    assert int(third["retry_after"]) > 0
    assert (seen["me"]["limit"], seen["me"]["used"]) == (1000, 500)
    assert seen["ledger"] == [["settled", 250], ["settled", 250]]
    assert seen["admin"] == [200, 200, 200]
