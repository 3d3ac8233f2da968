"""``make run`` (``project.devtools.run``): it refuses a taken PORT at once, names PORT, and
announces the demo only once its own server answers, with the static files collected."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from project.devtools import run
from tests.gateway_server import database_url, free_port

pytestmark = pytest.mark.integration


class Answering(BaseHTTPRequestHandler):
    """Another program on the port: an HTTP server that answers everything with 200."""

    run_id = ""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.run_id:
            self.send_header(run.RUN_ID_HEADER, self.run_id)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_program() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_env(port: int, tmp_path: Path, prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "PORT": str(port),
        "VAR_DIR": str(tmp_path),
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "QUOTAS_KEY_PREFIX": prefix,
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }


@pytest.mark.django_db
def test_a_taken_port_stops_the_run_at_once_naming_port(other_program, tmp_path, isolated_quotas):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "project.devtools.run"],
        cwd=settings.BASE_DIR,
        env=run_env(other_program, tmp_path, isolated_quotas),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert time.monotonic() - started < 5
    assert "PORT" in result.stderr and f"port {other_program}" in result.stderr
    assert "The demo is running" not in result.stdout
    assert not (tmp_path / "static").exists()  # nothing was started or prepared


def test_check_port_alone_answers_0_for_a_free_port(monkeypatch):
    monkeypatch.setenv("PORT", str(free_port()))
    assert run.main(["--check-port"]) == 0
    monkeypatch.setenv("PORT", "eighty")
    assert run.main(["--check-port"]) == 2


def test_only_a_server_echoing_this_runs_id_counts_as_ours(other_program):
    base_url = f"http://127.0.0.1:{other_program}"
    assert not run.our_server_answers(base_url, "abc123")
    Answering.run_id = "abc123"
    try:
        assert run.our_server_answers(base_url, "abc123")
        assert not run.our_server_answers(base_url, "another-run")
    finally:
        Answering.run_id = ""


def test_the_beat_schedule_goes_to_var_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    beat = run.child_commands(8000)["beat"]
    assert beat[beat.index("-s") + 1] == str(tmp_path / "celerybeat-schedule")


@pytest.mark.django_db(transaction=True)
def test_the_demo_starts_announces_itself_last_and_stops(tmp_path, isolated_quotas):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "project.devtools.run"],
        cwd=settings.BASE_DIR,
        env=run_env(port, tmp_path, isolated_quotas),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 90
        while not any("Press Ctrl-C to stop." in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/static/admin/css/base.css")
        assert conn.getresponse().status == 200  # collected and served
        conn.close()
        time.sleep(4)  # two beat periods: nothing may bury the banner
        banner_end = max(i for i, line in enumerate(lines) if "Press Ctrl-C" in line)
        after = [line for line in lines[banner_end + 1 :] if line.strip()]
        assert all("GET /static/admin/css/base.css" in line for line in after), after
        text = "".join(lines)
        assert "Admin" in text and "(admin / admin)" in text
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:  # a failed assertion: run.py still stops its children
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
